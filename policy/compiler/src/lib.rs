//! From the owner's plain English to p.rules: a multi-step LLM compiler whose output
//! is checked by the real policy engine and verified against scenarios written
//! independently from the same English. Every LLM answer is cached by the hash of
//! everything that went into it, so a compile is reproducible byte for byte and can
//! run offline. See docs/policy-compiler.md.

pub mod against;
pub mod annotate;
pub mod answer;
pub mod ask;
pub mod cache;
pub mod catalog_view;
pub mod chat;
pub mod config;
pub mod derive;
pub mod draft;
pub mod driver;
pub mod emit;
pub mod engine;
pub mod engine_impl;
pub mod exchange_log;
pub mod inputs;
pub mod learned_check;
pub mod lists;
pub mod llm;
pub mod pipeline;
pub mod prompts;
pub mod refine;
pub mod report;
pub mod scenarios;
pub mod schemas;
pub mod sentences;
pub mod verify;

pub use pipeline::{compile, CompileOptions, CompileResult, Paths};
pub use report::Status;
