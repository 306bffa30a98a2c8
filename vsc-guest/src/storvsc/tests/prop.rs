//! Property test: any stream of host packets (good, repeated, unknown, garbage) keeps the
//! driver's accounting exact and never panics.

use super::*;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    Submit {
        len: u16,
        write: bool,
    },
    Complete {
        pick: u16,
        srb: u8,
        scsi: u8,
        dtl: u32,
        sense: u8,
    },
    Repeat {
        pick: u16,
    },
    Unknown {
        id: u64,
    },
    Garbage {
        id_pick: u16,
        bytes: Vec<u8>,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u16..=16, any::<bool>()).prop_map(|(len, write)| Step::Submit { len, write }),
        (
            any::<u16>(),
            any::<u8>(),
            any::<u8>(),
            any::<u32>(),
            any::<u8>()
        )
            .prop_map(|(pick, srb, scsi, dtl, sense)| Step::Complete {
                pick,
                srb,
                scsi,
                dtl,
                sense
            }),
        any::<u16>().prop_map(|pick| Step::Repeat { pick }),
        any::<u64>().prop_map(|id| Step::Unknown { id }),
        (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..80))
            .prop_map(|(id_pick, bytes)| Step::Garbage { id_pick, bytes }),
    ]
}

proptest! {
    #[test]
    fn accounting_survives_any_host(steps in proptest::collection::vec(step(), 1..200)) {
        let mut drv = ready();
        let pfns: Vec<u64> = (0..5).collect();
        let mut sent: Vec<OutPacket> = Vec::new();
        let mut done: Vec<u64> = Vec::new();
        let mut completions = 0u64;
        for s in steps {
            match s {
                Step::Submit { len, write } => {
                    let bytes = u32::from(len) * 512;
                    let range = PageRange::new(0, bytes, &pfns[..bytes.div_ceil(4096) as usize]).unwrap();
                    let dir = if write { Direction::Out } else { Direction::In };
                    let r = drv.submit(&ScsiRequest {
                        addr: ScsiAddress::default(),
                        cdb: cdb::rw10(write, 0, len, false),
                        data: Some((dir, range)),
                        tagged: true,
                        tag: sent.len() as u64,
                    });
                    if r.is_ok() {
                        sent.extend(drain(&mut drv, 0));
                    }
                }
                Step::Complete { pick, srb, scsi, dtl, sense } if !sent.is_empty() => {
                    let p = &sent[pick as usize % sent.len()];
                    let s = fixed_sense(sense & 0xF, sense, sense);
                    let c = srb_done(p, srb, scsi, dtl, &s);
                    let r = reply(&mut drv, 0, p.trans_id, &c);
                    prop_assert!(r.is_ok());
                    if r == Ok(Handled::Completion) {
                        done.push(p.trans_id);
                    }
                }
                Step::Repeat { pick } if !done.is_empty() => {
                    let id = done[pick as usize % done.len()];
                    prop_assert_eq!(reply(&mut drv, 0, id, &complete_io(0)), Ok(Handled::Duplicate));
                }
                Step::Unknown { id } => {
                    let r = reply(&mut drv, 0, id, &complete_io(0));
                    prop_assert!(r.is_err() || matches!(r, Ok(Handled::Duplicate) | Ok(Handled::Unsolicited) | Ok(Handled::Completion)));
                    if r == Ok(Handled::Completion) {
                        done.push(id);
                    }
                }
                Step::Garbage { id_pick, bytes } => {
                    let id = sent.get(id_pick as usize % sent.len().max(1)).map_or(u64::from(id_pick), |p| p.trans_id);
                    if let Ok(Handled::Completion) = drv.handle_packet(0, PacketType::Completion, id, &bytes) {
                        done.push(id);
                    }
                }
                _ => {}
            }
            while let Some(c) = drv.poll_completion() {
                completions += 1;
                prop_assert!(c.transferred() <= c.requested);
                prop_assert!(c.sense_bytes().len() <= 20);
                let _ = c.result();
            }
            let st = drv.stats();
            prop_assert_eq!(st.completed, completions);
            prop_assert_eq!(st.submitted, completions + drv.in_flight() as u64);
            prop_assert_eq!(u64::from(drv.outstanding(0)), drv.in_flight() as u64);
        }
    }
}
