//! VMBus channel protocol: wire messages, host and guest sans-IO state machines, GPADLs, the SynIC port trait and the out-of-process VSP protocol (not yet built; see issue 5).
#![cfg_attr(not(test), no_std)]
