//! Arguments of the commands that serve the operator's tooling: shell
//! completions and man pages (for packages).

use std::path::PathBuf;

use clap::Args;

use super::Common;

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to write completions for (on stdout).
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Where to write the pages: diskferry.1 and one diskferry-COMMAND.1 per command.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub common: Common,
}
