fn main() {
    eprintln!("ironinit: not implemented yet");
    std::process::exit(1)
}
