use blog_domain::Service;

fn main() -> std::process::ExitCode {
    blog_kit::service::main(Service::Posts, posts::Config::from_env, |c| c.common.port, posts::run)
}
