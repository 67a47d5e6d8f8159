#![doc = include_str!("../README.md")]

pub mod atomic;
pub mod bench;
pub mod data;
pub mod driver;
pub mod engine;
pub mod experiments;
pub mod monitor;
pub mod parallel;
pub mod report;
