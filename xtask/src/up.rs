//! `cargo xtask up`: the whole suite on this machine, one OS process per
//! service, behind a gateway that routes like the Ingress. With `--scale N`,
//! N replicas of every service on PostgreSQL, the bus's on a 3-node NATS
//! cluster with JetStream (see `blog_local::Options::scale`).

use std::{path::PathBuf, time::Duration};

use blog_domain::Service;
use blog_kit::shutdown::shutdown_signal;
use blog_local::{Options, Suite, nats, postgres, routes, supervisor::LogSink};

/// Replicas `--scale` accepts: replica i of a service listens on its usual
/// port + 100 × i, which stays clear of the other services' ports up to 9.
const MAX_REPLICAS: usize = 9;
/// The suite's own PostgreSQL, clear of a system server on 5432.
const POSTGRES_PORT: u16 = 5433;
/// The first NATS node's client port (NATS's usual one); node i listens on
/// it + i - 1, its routes 100 above and its monitoring 200 above.
const NATS_PORT: u16 = 4222;

pub fn run(mut args: pico_args::Arguments) -> crate::Result {
    let data_dir: PathBuf = args.opt_value_from_str("--data-dir")?.unwrap_or_else(|| PathBuf::from(".data"));
    let gateway_port: u16 = args.opt_value_from_str("--gateway-port")?.unwrap_or(8080);
    let replicas: usize = args.opt_value_from_str("--scale")?.unwrap_or(1);
    let postgres_port: u16 = args.opt_value_from_str("--postgres-port")?.unwrap_or(POSTGRES_PORT);
    let release = args.contains("--release");
    crate::no_more_arguments(args)?;
    if !(1..=MAX_REPLICAS).contains(&replicas) {
        return Err(format!("--scale takes 1 to {MAX_REPLICAS} replicas").into());
    }
    let data_dir = std::path::absolute(data_dir)?;
    let mut options = Options::standard(PathBuf::new(), data_dir.clone(), gateway_port, LogSink::Stdout);
    let nats_nodes = (1..=nats::NODES).map(|i| nats::NodePorts::from_base(NATS_PORT, i)).collect();
    options.scale(replicas, postgres_port, nats_nodes, |service, i| service.default_port() + 100 * i as u16);
    if options.postgres_port.is_some() {
        postgres::ensure_installed()?;
    }
    if !options.nats.is_empty() {
        nats::ensure_installed()?;
    }
    options.bin_dir = crate::build_services(release)?;
    show_gateway_warnings();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let suite = Suite::launch(options).await?;
        let ready = suite.wait_ready(Duration::from_secs(30)).await;
        println!("\nblog suite is up (data in {}):", data_dir.display());
        println!("  {:<11} http://{}  (routes as the Ingress for {})", "gateway", suite.gateway_addr, routes::HOST);
        for service in Service::ALL {
            let processes = suite.options.processes(service);
            if processes.len() == 1 && processes[0].0 == service.name() {
                println!("  {:<11} {}", service.name(), suite.options.url(service));
            } else {
                let replicas: Vec<String> = processes.iter().map(|(name, port)| format!("{name} :{port}")).collect();
                println!("  {:<11} {}  (balanced over {})", service.name(), suite.options.url(service), replicas.join(", "));
            }
        }
        if let Some(postgres) = &suite.postgres {
            let databases: Vec<&str> = postgres::database_services().map(Service::name).collect();
            println!("  {:<11} {}  (databases {})", "postgres", postgres.display_url(""), databases.join(", "));
            println!(
                "  {:<11} cluster in {}, password in {}",
                "",
                data_dir.join("postgres").display(),
                data_dir.join("postgres.password").display()
            );
        }
        if let Some(nats) = &suite.nats {
            for (i, node) in nats.nodes().iter().enumerate() {
                let name = nats::process_name(i + 1);
                println!(
                    "  {:<11} nats://127.0.0.1:{}  (routes :{}, monitoring http://127.0.0.1:{}, JetStream in {})",
                    name,
                    node.client,
                    node.cluster,
                    node.monitor,
                    data_dir.join(&name).display()
                );
            }
            println!("  {:<11} the bus's replicas share the JetStream stream BLOG_EVENTS on {}", "", nats.url());
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

/// Prints what the gateway (it runs in this process) warns of, as a
/// `gateway |` line beside the services' own: a replica that refused a
/// connection, an upstream that did not answer in time, the connection cap
/// reached. `RUST_LOG` chooses the levels, as for the services; warnings by
/// default.
fn show_gateway_warnings() {
    /// Writes each formatted line behind the gateway's prefix.
    struct Prefixed;
    impl std::io::Write for Prefixed {
        fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
            print!("{:>10} | {}", "gateway", String::from_utf8_lossy(line));
            Ok(line.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            std::io::Write::flush(&mut std::io::stdout())
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(|| Prefixed).try_init();
}
