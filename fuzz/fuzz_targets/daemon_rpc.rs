//! The daemon's request decoder: any line a process on its socket (or
//! standard input) sends, then each method's params. The decoder is the
//! very file the daemon compiles (it needs only serde), included by path,
//! so the command line stays a binary.
#![no_main]
#![allow(dead_code)]
use libfuzzer_sys::fuzz_target;

#[path = "../../crates/cli/src/daemon/rpc.rs"]
mod rpc;
use rpc::*;

fn each_params(p: serde_json::Value) {
    let _ = params::<SendParams>(p.clone());
    let _ = params::<ReactParams>(p.clone());
    let _ = params::<EditParams>(p.clone());
    let _ = params::<DeleteParams>(p.clone());
    let _ = params::<Which>(p.clone());
    let _ = params::<ReceiveParams>(p.clone());
    let _ = params::<SubscribeParams>(p.clone());
    let _ = params::<AckParams>(p.clone());
    let _ = params::<CreateGroupParams>(p.clone());
    let _ = params::<HandleParams>(p.clone());
    let _ = params::<VerifyParams>(p.clone());
    let _ = params::<SaveFilesParams>(p.clone());
    let _ = params::<SettingsParams>(p.clone());
    let _ = params::<DisappearingParams>(p.clone());
    let _ = params::<AccountDeleteParams>(p.clone());
    let _ = params::<LinklistImportParams>(p.clone());
    let _ = params::<CallParams>(p.clone());
    let _ = params::<NoParams>(p);
}

fuzz_target!(|data: &[u8]| {
    let requests = match decode_line(data) {
        Ok(Line::One(v)) => vec![v],
        Ok(Line::Batch(b)) => b,
        Err(_) => return,
    };
    for r in requests {
        if let Ok(r) = decode_request(r) {
            each_params(r.params);
        }
    }
});
