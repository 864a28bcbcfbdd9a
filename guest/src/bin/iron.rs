fn main() {
    eprintln!("iron: not implemented yet");
    std::process::exit(5)
}
