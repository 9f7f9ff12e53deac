use blog_common::{Service, server};

fn main() -> std::process::ExitCode {
    server::main(Service::EventBus, event_bus::Config::from_env, |c| c.port, event_bus::run)
}
