//! The vmcp guest agent: `/init` of the micro-VM.
