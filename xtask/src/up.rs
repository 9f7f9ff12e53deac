//! `cargo xtask up`: the whole suite on this machine, one OS process per
//! service, behind a gateway that routes like the Ingress.

use std::{path::PathBuf, time::Duration};

use blog_domain::Service;
use blog_kit::shutdown::shutdown_signal;
use blog_local::{Options, Suite, routes, supervisor::LogSink};

pub fn run(mut args: pico_args::Arguments) -> crate::Result {
    let data_dir: PathBuf = args.opt_value_from_str("--data-dir")?.unwrap_or_else(|| PathBuf::from(".data"));
    let gateway_port: u16 = args.opt_value_from_str("--gateway-port")?.unwrap_or(8080);
    let release = args.contains("--release");
    let rest = args.finish();
    if !rest.is_empty() {
        return Err(format!("unexpected arguments: {rest:?}").into());
    }
    let bin_dir = crate::build_services(release)?;
    let data_dir = std::path::absolute(data_dir)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let suite = Suite::launch(Options::standard(bin_dir, data_dir.clone(), gateway_port, LogSink::Stdout)).await?;
        let ready = suite.wait_ready(Duration::from_secs(30)).await;
        println!("\nblog suite is up (data in {}):", data_dir.display());
        println!("  {:<11} http://{}  (routes as the Ingress for {})", "gateway", suite.gateway_addr, routes::HOST);
        for service in Service::ALL {
            println!("  {:<11} {}", service.name(), suite.options.url(service));
        }
        match ready {
            Ok(()) => println!("open http://{} in a browser; Ctrl-C stops everything\n", suite.gateway_addr),
            Err(e) => println!("warning: {e}\n"),
        }
        shutdown_signal().await;
        println!("stopping…");
        suite.stop().await;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
