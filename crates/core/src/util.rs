//! Small helpers every layer uses: sizes and counts for people, settings chosen by name, and
//! progress reports of long work. Nothing here knows about models or devices.

/// `1.50 GiB`, `12.0 KiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// `671.03B`, `2.80M`, `12.5K`.
pub fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// A setting chosen by name: `--gpu vulkan`, `--kv-cache f16`. Each value has one name and a
/// line of help; a command line lists them (the `dsrun` binary builds its flags' value parsers
/// from `ALL`, so the names live here once).
pub trait Choice: Sized + Copy + PartialEq + 'static {
    /// Every value with its name and help, in the order help lists them.
    const ALL: &'static [(Self, &'static str, &'static str)];

    fn name(self) -> &'static str {
        Self::ALL.iter().find(|(v, ..)| *v == self).map_or("", |(_, name, _)| name)
    }

    /// The value named `name` (exactly, as listed).
    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n, _)| *n == name).map(|(v, ..)| *v)
    }

    /// The names, for messages: "keep, f16, q8, q4".
    fn names() -> String {
        Self::ALL.iter().map(|(_, n, _)| *n).collect::<Vec<_>>().join(", ")
    }
}

/// Declares a [`Choice`] and its `FromStr` (an error that lists the names).
macro_rules! choices {
    ($ty:ident { $($variant:ident => $name:literal : $help:literal),* $(,)? }) => {
        impl $crate::util::Choice for $ty {
            const ALL: &'static [($ty, &'static str, &'static str)] = &[$(($ty::$variant, $name, $help)),*];
        }
        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<$ty, String> {
                <$ty as $crate::util::Choice>::from_name(s)
                    .ok_or_else(|| format!("`{s}`: expected one of {}", <$ty as $crate::util::Choice>::names()))
            }
        }
    };
}
pub(crate) use choices;

/// What long work reports as it goes: loading and converting weights, scanning a checkpoint,
/// writing one. The `dsrun` binary shows a progress bar; a library user may log or ignore it.
/// Called from several threads at once.
pub trait Progress: Sync {
    /// Work of `total` units begins (`message` says what; `bytes`: the units are bytes, else
    /// they are counted things such as matrices or tensors).
    fn start(&self, message: &str, total: u64, bytes: bool) {
        let _ = (message, total, bytes);
    }
    /// `units` more are done.
    fn advance(&self, units: u64) {
        let _ = units;
    }
    /// The work is over (the bar goes away).
    fn finish(&self) {}
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}
