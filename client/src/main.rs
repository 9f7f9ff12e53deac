use blog_domain::Service;

fn main() -> std::process::ExitCode {
    blog_kit::service::main(Service::Client, client::Config::from_env, |c| c.port, client::run)
}
