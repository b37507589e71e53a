#![allow(dead_code)]

pub mod emulator;
