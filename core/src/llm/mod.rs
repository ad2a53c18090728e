//! LLM serving in the core (issue 11). `text`: tokenizers, chat templates, incremental
//! detokenization, stop handling and usage — what the scheduler and the `/v1` routes call.

pub mod text;
