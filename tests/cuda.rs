//! The native CUDA backend (`--features cuda`). Where a piece cannot run on this machine (no
//! NVIDIA driver or device, no NVRTC), the test says so on stderr with "NOT RUN" and checks that
//! the backend reports the absence as a clear error; it never passes silently as if it ran.
#![cfg(feature = "cuda")]

mod common;
use common::random;

use dsrun::backend::cpu;
use dsrun::backend::cuda::{self, compile, MATVEC_SOURCE};
use dsrun::model::weights::Matrix;
use dsrun::quant::DType;

#[test]
fn opening_a_device_names_it_or_says_why_not() {
    match cuda::open(0) {
        Ok(device) => eprintln!("CUDA device: {}", device.describe()),
        Err(e) => {
            let message = e.to_string();
            eprintln!("NOT RUN on a device: {message}");
            assert!(message.contains("--gpu cuda") && (message.contains("driver") || message.contains("device")), "{message}");
        }
    }
}

#[test]
fn kernels_compile_for_hopper_and_older_gpus() {
    if !cuda::nvrtc_present() {
        eprintln!("NOT RUN: libnvrtc not found (pip install nvidia-cuda-nvrtc-cu12; put its lib folder on LD_LIBRARY_PATH)");
        let err = compile(MATVEC_SOURCE, &[], "compute_90").err().expect("compiling without NVRTC fails").to_string();
        assert!(err.contains("NVRTC"), "{err}");
        return;
    }
    for arch in ["compute_80", "compute_90"] {
        for format in [1u32, 3] {
            let ptx = compile(MATVEC_SOURCE, &[("FORMAT", format), ("TOKENS", 8)], arch).unwrap().to_src();
            assert!(ptx.contains(".entry matvec"), "{arch} format {format}: no matvec entry");
            // FP8 uses the hardware converter on sm_89+ only.
            let hardware = ptx.contains("cvt.rn.f16x2.e4m3x2");
            assert_eq!(hardware, format == 3 && arch == "compute_90", "{arch} format {format}");
        }
    }
}

#[test]
fn matvec_matches_the_cpu_reference_on_a_device() {
    let device = match cuda::open(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("NOT RUN: {e}");
            return;
        }
    };
    for dtype in [DType::BF16, DType::F8E4M3] {
        for n in [1usize, 3, 8] {
            let (rows, cols) = (300, 512);
            let m = Matrix::from_values("w", rows, cols, dtype, &random(1, rows * cols), (128, 128));
            let x = random(2, n * cols);
            let got = device.matvec(&m, &x, n).unwrap();
            let want = cpu::matmul(&m, &x, n);
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let err = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs())) / scale;
            // f32 sums in another order than the CPU: ~1e-6 relative.
            assert!(err < 1e-4, "{dtype:?} n={n}: relative error {err}");
        }
    }
}
