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
mod reload;
mod serve;
mod store_setup;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's allocator: the proxy allocates per request (headers, bodies,
/// futures), and glibc's free lists and consolidation showed up as about a tenth of its CPU.
/// (The `system-allocator` feature leaves glibc's, for heap profilers such as heaptrack.)
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Before anything else opens a descriptor: the listeners a reload passed on.
    portcullis_config::sockets::adopt_inherited();
    let args = cli::Cli::parse();
    // The node's own work (admin API, DNS over TCP, certificates, the store) runs on one
    // thread, with the first proxy worker; the other proxy workers run on threads of their own
    // (`node.workers`). Connections stay on the thread that accepted them: no work stealing,
    // no cross-thread wakeups.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
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
