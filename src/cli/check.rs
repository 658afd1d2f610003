//! `dsrun check`: scan every tensor of a checkpoint for non-finite values.

use super::args::ModelArgs;
use super::progress::Bar;
use clap::Args;
use dsrun::error::{Error, Result};

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: CheckArgs) -> Result<()> {
    let dir = args.model.dir();
    let report = dsrun::check::run(&dir, &Bar::new())?;
    super::print(&dsrun::check::describe(&report))?;
    if report.bad.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(format!("{}: {} tensor(s) hold non-finite values", dir.display(), report.bad.len())))
    }
}
