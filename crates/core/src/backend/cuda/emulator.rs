//! Runs dsrun's CUDA kernels on the CPU (tests, and machines without an NVIDIA GPU): the
//! kernel source is compiled by the host C++ compiler after kernels/emulator.h, loaded as a
//! shared library, and each launch runs every block's threads as fibers. Device memory is host
//! memory, so device addresses are host addresses.

use super::args::Buffer;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const HEADER: &str = include_str!("kernels/emulator.h");

type LaunchFn = unsafe extern "C" fn(*const u32, *const u32, *mut *mut c_void) -> *const std::ffi::c_char;

#[derive(Clone)]
pub struct EmulatedKernel {
    name: String,
    entry: LaunchFn,
    _library: Arc<libloading::Library>,
}

pub struct Emulator {
    compiler: String,
    dir: PathBuf,
    /// Allocations by address, in 16-byte words (kernels load float4s).
    memory: Mutex<HashMap<u64, Box<[u128]>>>,
}

impl Emulator {
    pub fn new() -> Result<Emulator> {
        let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let probe = std::process::Command::new(&compiler).arg("--version").output();
        if !probe.map(|o| o.status.success()).unwrap_or(false) {
            return Err(Error::NoDevice(format!("CUDA emulator: no C++ compiler (`{compiler}`); install g++ or set CXX")));
        }
        // A compile cache shared by every emulator: libraries are named by a hash of what built them.
        let dir = std::env::temp_dir().join("dsrun-cuda-emulator");
        std::fs::create_dir_all(&dir).map_err(|e| Error::device("CUDA emulator", format!("creating {}", dir.display()), e))?;
        Ok(Emulator { compiler, dir, memory: Default::default() })
    }

    /// Compiles `source` with `defines` and exports `names`.
    pub fn compile(&self, source: &str, defines: &[(&str, u32)], names: &[&str]) -> Result<Vec<EmulatedKernel>> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (source, defines, names, crate::format::wgsl_constants()).hash(&mut hasher);
        let stem = format!("k{:016x}", hasher.finish());
        let lib_path = self.dir.join(format!("{stem}.so"));
        if !lib_path.exists() {
            // Built under a private name and renamed, so concurrent compiles never see half a file.
            static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let private = format!("{stem}-{}-{}", std::process::id(), BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            let src_path = self.dir.join(format!("{private}.cpp"));
            let tmp_path = self.dir.join(format!("{private}.so"));
            let mut text = format!("{HEADER}\n#line 1 \"kernel.cu\"\n{source}\n");
            for n in names {
                text += &format!("DSRUN_EXPORT({n})\n");
            }
            std::fs::write(&src_path, text).map_err(|e| Error::device("CUDA emulator", format!("writing {}", src_path.display()), e))?;
            let mut cmd = std::process::Command::new(&self.compiler);
            cmd.args(["-std=c++17", "-O2", "-shared", "-fPIC", "-w", "-o"]).arg(&tmp_path).arg(&src_path);
            for (k, v) in defines {
                cmd.arg(format!("-D{k}={v}"));
            }
            for (k, v) in crate::format::cuda_defines() {
                cmd.arg(format!("-D{k}={v}"));
            }
            let out = cmd.output().map_err(|e| Error::device("CUDA emulator", format!("running {}", self.compiler), e))?;
            let _ = std::fs::remove_file(&src_path);
            if !out.status.success() {
                return Err(Error::Kernel { device: "CUDA emulator".into(), reason: format!("compiling kernels failed:\n{}", String::from_utf8_lossy(&out.stderr)) });
            }
            std::fs::rename(&tmp_path, &lib_path).map_err(|e| Error::device("CUDA emulator", format!("storing {}", lib_path.display()), e))?;
        }
        // SAFETY: a library we just built from our own sources; its constructors do nothing.
        let library = Arc::new(unsafe { libloading::Library::new(&lib_path) }.map_err(|e| Error::device("CUDA emulator", format!("loading {}", lib_path.display()), e))?);
        names
            .iter()
            .map(|n| {
                let symbol = format!("dsrun_launch_{n}");
                // SAFETY: DSRUN_EXPORT defines the symbol with exactly this signature.
                let entry: LaunchFn = unsafe { library.get::<LaunchFn>(symbol.as_bytes()).map(|f| *f) }.map_err(|e| Error::device("CUDA emulator", format!("finding kernel `{n}`"), e))?;
                Ok(EmulatedKernel { name: n.to_string(), entry, _library: library.clone() })
            })
            .collect()
    }

    pub fn alloc(&self, bytes: usize) -> Buffer {
        let memory: Box<[u128]> = vec![0u128; bytes.div_ceil(16)].into_boxed_slice();
        let ptr = memory.as_ptr() as u64;
        self.memory.lock().unwrap().insert(ptr, memory);
        Buffer { ptr, bytes }
    }

    pub fn write(&self, ptr: u64, data: &[u8]) {
        // SAFETY: the runtime checked the range against a live allocation of this emulator.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr as *mut u8, data.len()) }
    }

    pub fn read(&self, ptr: u64, out: &mut [u8]) {
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(ptr as *const u8, out.as_mut_ptr(), out.len()) }
    }

    pub fn launch(&self, k: &EmulatedKernel, grid: [u32; 3], block: [u32; 3], params: &mut [*mut c_void]) -> Result<()> {
        // The emulator's scheduler state is global: one launch at a time in the process.
        static RUNNING: Mutex<()> = Mutex::new(());
        let _one = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the parameters match the kernel's signature (the caller's contract, as with
        // cuLaunchKernel); buffers are live host memory.
        let failure = unsafe { (k.entry)(grid.as_ptr(), block.as_ptr(), params.as_mut_ptr()) };
        if failure.is_null() {
            return Ok(());
        }
        // SAFETY: a static C string from emulator.h.
        let why = unsafe { std::ffi::CStr::from_ptr(failure) }.to_string_lossy();
        Err(Error::device("CUDA emulator", format!("running kernel `{}`", k.name), why))
    }
}
