fn main() {
    eprintln!("push: not built yet (issue 3)");
    std::process::exit(1);
}
