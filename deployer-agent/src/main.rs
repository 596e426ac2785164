fn main() {
    eprintln!("deployer-agent: not built yet (issue 4)");
    std::process::exit(1);
}
