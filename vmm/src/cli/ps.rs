//! `ironvmm ps`: the running VMs, found by their control sockets.

use crate::approvals::socket;

#[derive(clap::Args, Debug)]
pub struct PsArgs {
    /// One JSON object per VM.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PsArgs) -> u8 {
    let vms = match socket::running_vms() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("ironvmm ps: {e}");
            return 1;
        }
    };
    if a.json {
        for v in &vms {
            let mut o = v.info.clone();
            o.insert("socket".into(), v.socket.display().to_string().into());
            println!("{}", serde_json::Value::Object(o));
        }
        return 0;
    }
    println!(
        "{:<32} {:>8} {:>8} {:<8} SOCKET",
        "VM", "PID", "PENDING", "APPROVER"
    );
    for v in &vms {
        println!(
            "{:<32} {:>8} {:>8} {:<8} {}",
            v.vm,
            v.info.get("pid").map(|p| p.to_string()).unwrap_or_default(),
            v.info
                .get("pending")
                .map(|p| p.to_string())
                .unwrap_or_default(),
            v.info
                .get("approver")
                .and_then(|p| p.as_str())
                .unwrap_or(""),
            v.socket.display()
        );
    }
    0
}
