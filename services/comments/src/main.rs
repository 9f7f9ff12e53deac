use blog_domain::Service;

fn main() -> std::process::ExitCode {
    blog_kit::service::main(Service::Comments, comments::Config::from_env, |c| c.common.port, comments::run)
}
