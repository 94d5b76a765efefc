//! `portcullis`: one binary per ingress node. `serve` runs a node; the other commands talk to a
//! node's admin API, or help around it (the dev CA's root, a demo backend).

mod admin;
mod admin_domains;
mod admin_listener;
mod admin_metrics;
mod cli;
mod cli_domains;
mod client;
mod demo;
mod exit;
mod membership;
mod serve;
mod store_setup;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's allocator: the proxy allocates per request (headers, bodies,
/// futures), and glibc's free lists and consolidation showed up as about a tenth of its CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // One worker: a current-thread runtime, with none of the work-stealing scheduler's
    // cross-thread parking and stealing, which buys nothing with a single worker.
    let mut builder = match args.workers() {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(workers) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(workers);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::EX_SOFTWARE as u8);
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.code as u8)
        }
    }
}
