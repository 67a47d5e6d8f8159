#![doc = include_str!("../README.md")]

pub mod atomic;
pub mod bench;
pub mod data;
pub mod dist;
pub mod engine;
pub mod experiments;
pub mod monitor;
pub mod report;
