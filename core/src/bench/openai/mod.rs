//! `--protocol openai`: streamed chat completions against any OpenAI-compatible server
//! (UniModel's `/v1`, vLLM, llama.cpp's `llama-server`, TGI), timed per token.
//!
//! The load drivers (closed and open loop, `--requests`), the tally, the reports and the chart
//! are the bench's own; this module adds what a token stream needs:
//!
//! - `prompts`: the conversations and the request bodies made from them.
//! - `sse`: the incremental event-stream parser.
//! - `chunk`: what one event's data says (content, usage, error, `[DONE]`).
//! - `timing`: one stream's timeline: TTFT, inter-token gaps, tokens.
//! - `stats`: those summed over a step (`GenStats` in the report).
//! - `client`: the virtual client that sends and reads the streams.

pub mod chunk;
pub mod client;
pub mod prompts;
pub mod sse;
#[cfg(test)]
mod standin;
pub mod stats;
pub mod timing;
