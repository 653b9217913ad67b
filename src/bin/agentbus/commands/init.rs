use std::io::Write;

use clap::Args;
use serde_json::json;

use super::{writer, Durable};
use crate::output::{emit, path_json, Failure};
use crate::Cli;

/// Create the bus directory (safe to run again).
#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    durable: Durable,
}

pub fn run(cli: &Cli, args: &InitArgs, out: &mut impl Write) -> Result<(), Failure> {
    let bus = writer(cli, &args.durable).init(&cli.dir)?;
    emit(out, &json!({"init": path_json(bus.path())}))
}
