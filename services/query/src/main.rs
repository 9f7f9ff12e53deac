use blog_domain::Service;

fn main() -> std::process::ExitCode {
    blog_kit::service::main(Service::Query, query::Config::from_env, |c| c.common.port, query::run)
}
