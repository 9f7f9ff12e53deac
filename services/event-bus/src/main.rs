use blog_domain::Service;

fn main() -> std::process::ExitCode {
    blog_kit::service::main(Service::EventBus, event_bus::Config::from_env, |c| c.port, event_bus::run)
}
