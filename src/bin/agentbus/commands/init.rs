use std::io::Write;

use agentbus::Bus;
use clap::Args;
use serde_json::json;

use crate::output::{emit, path_json, Failure};
use crate::Cli;

/// Create the bus directory (safe to run again).
#[derive(Args, Debug)]
pub struct InitArgs {}

pub fn run(cli: &Cli, _args: &InitArgs, out: &mut impl Write) -> Result<(), Failure> {
    let bus = Bus::builder().init(&cli.dir)?;
    emit(out, &json!({"init": path_json(bus.path())}))
}
