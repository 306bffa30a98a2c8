//! Guest-side VMBus drivers (VSCs): storvsc, netvsc and integration-component clients as a no_std + alloc library (not yet built).
#![cfg_attr(not(test), no_std)]
