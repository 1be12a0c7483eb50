//! `v3r`: run v3c artifacts on a CUDA GPU. No compiler inside; see `v3r --help`.

// The arguments' doc comments are clap's help text, written for a terminal (`[ids]`, `<think>`).
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use v3c_runtime::cli::positive;
use v3c_runtime::device;

/// Run DeepSeek-V3 artifacts compiled by `v3c` on an NVIDIA GPU.
///
/// `v3r` is the runtime half of v3c: it loads an artifact directory written by `v3c compile`
/// (kernels, launch plan, manifest), uploads weights from Hugging Face safetensors and runs
/// inference. It links no compiler, so it ships next to the artifact.
#[derive(Parser)]
#[command(name = "v3r", version, propagate_version = true, max_term_width = 100)]
#[command(
    after_help = "Examples:\n  v3r doctor                 # driver, GPU, compute capability, memory\n  v3r info out/deepseek-v3   # what an artifact holds (every file's hash checked)\n  v3r info out/tiny-cpu --weights ckpt/   # and whether a checkpoint fits its plan\n  v3r bench-kernels out/tiny-cpu --weights ckpt/ --out timings.json\n  v3r run out/deepseek-v3 --weights /models/DeepSeek-V3 --prompt-tokens \"0 3 17\" --max-new-tokens 32\n  v3r run out/deepseek-v3 --weights ckpt/ --prompts-file p.txt --batch 64   # more wait, then join\n  v3r run out/spec --weights ckpt/ --prompt-tokens \"0 3 17\" --speculative   # MTP drafts\n  v3r logits out/small --weights ckpt/ --tokens \"0 3 17\" --out logits.safetensors\n  v3r bench-decode out/slice --random-weights 1 --batch 1,64   # decode tokens/s, no checkpoint\n  v3r bench-prefill out/slice --random-weights 1 --tokens 4096   # prefill tokens/s\n  v3r bench-train out/slice-train --random-weights 1 --steps 4   # training tokens/s\n  v3r tune cands/ --out tuning.json   # measure `v3c tune --emit-candidates cands/`\n  V3R_DUMP_DIR=dump v3r logits out/small --weights ckpt/ --tokens \"0 3\" --out l.safetensors"
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace); V3C_LOG=<filter> overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report the CUDA driver and every GPU (name, compute capability, memory); works without a GPU.
    Doctor(DoctorArgs),
    /// Describe an artifact: target, model, entry points, kernels, and whether this machine can run it.
    Info(InfoArgs),
    /// Generate tokens with an artifact and a checkpoint; prints token ids and tokens/s (cpu artifacts
    /// run here, sm_90a ones on a Hopper GPU: V3R_SYNC_EACH=1 names a faulting kernel).
    Run(RunArgs),
    /// Serve requests read from stdin as they arrive, one a line — token ids, or JSON
    /// {"prompt": [ids], "max_new_tokens": N, "temperature": T, "top_p": P, "seed": S, "stop":
    /// [[ids], ...], "logprobs": true, "top_logprobs": K, "echo": true, "id": ...} (and top_k,
    /// min_p, the penalties, logit_bias, min_tokens, stop_token_ids); with a tokenizer also
    /// {"text": "...", "stop_text": ["...", ...]}, {"messages": [...], "tools": [...],
    /// "tool_choice": ...} (a chat, written by the chat template) and the guided ones
    /// (response_format, guided_json, guided_regex, guided_choice, guided_grammar) — with at most
    /// --batch sequences decoding together, each request joining the running batch as it arrives
    /// (a slot and cache pages free); one JSON line per request on stdout as it ends (its tokens,
    /// with a tokenizer their text, tool_calls, reasoning_content, finish_reason, times).
    /// --max-new-tokens, --temperature, --top-p and --seed fill what a request leaves out; a line
    /// {"cancel": ID} ends the latest request of that id (with the tokens it has).
    Serve(ServeArgs),
    /// Text to token ids, or (--decode) ids to text, with a Hugging Face tokenizer.json: the
    /// tokenizer `run --prompt` and `serve` use.
    Tokenize(TokenizeArgs),
    /// Chat with the model: each line of stdin a user's message, the reply written as it is
    /// generated — the conversation so far written by the tokenizer's chat template each turn (on a
    /// pool of pages, the earlier turns' pages shared: only the new turn is prefilled). An empty
    /// line or the end of stdin ends it.
    Chat(ChatArgs),
    /// Perplexity of the model over a token file or (--tokenizer) text: the artifact's prefill over
    /// windows of --window tokens every --stride tokens, each token after a window's first scored
    /// once (Hugging Face's sliding-window recipe); prints the perplexity, the mean negative
    /// log-likelihood and tokens/s (--json: one JSON object). How a compiled model's accuracy is
    /// checked against its other backends.
    Perplexity(PerplexityArgs),
    /// Logits of every token of a prompt (the prefill entry, from position 0) written as safetensors
    /// (`logits` F32 [tokens, vocab]): how an artifact is checked against `v3c logits`.
    Logits(LogitsArgs),
    /// Time whole decode steps (the launches a generation's step runs) at batch sizes and a context length,
    /// as tokens/s; with a checkpoint or with made-up weights (`--random-weights`, for full-width
    /// slices no checkpoint is at hand for).
    BenchDecode(BenchDecodeArgs),
    /// Time a prompt's prefill: chunks of a number of tokens after a number of cached rows (the
    /// launches a prompt's last chunk runs: its caches and the last row's logits), as ms per chunk
    /// and tokens/s; with a checkpoint or made-up weights (`--random-weights`), on random tokens.
    BenchPrefill(BenchPrefillArgs),
    /// Serve a synthetic load and time it as a serving benchmark does: requests with random prompts
    /// (lengths uniform in a range) arriving all at once or at a rate, each joining the running batch
    /// as slots free; throughput, time to first token, time per output token and latency (mean,
    /// p50, p99); with a checkpoint or made-up weights.
    BenchServe(BenchServeArgs),
    /// Measure the GEMM and attention candidates `v3c tune --emit-candidates DIR` compiled (each
    /// checked against the default configuration, the default against the host's product or
    /// attention) and merge the timings into a tuning database for `v3c compile --tuning`.
    Tune(TuneArgs),
    /// Time every kernel of an artifact's entry points (warm-up, median of repetitions; on a GPU
    /// each launch after an L2-evicting memset, by CUDA events) and write JSON, as the tuner reads
    /// it; with a checkpoint or made-up weights (`--random-weights`); cpu artifacts run here, GPU
    /// ones need their GPU.
    BenchKernels(BenchArgs),
    /// Time whole training steps of a training-step artifact (`v3c compile --train`): parameters
    /// bound, the step run, AdamW on the host — medians and tokens/s; with a checkpoint or made-up
    /// weights (`--random-weights`), on random tokens. Nothing is written but `--out`.
    BenchTrain(BenchTrainArgs),
    /// Train with a training-step artifact (`v3c compile --target cpu --train`): windows sampled
    /// from a token file, AdamW with the loss-free balancing, as `v3c train` does; writes the
    /// checkpoint (HF layout), optimizer state (resumable), loss log and expert loads.
    Train(TrainArgs),
}

#[derive(Args)]
struct TrainArgs {
    /// Artifact directory written by `v3c compile --train` (cpu: runs here; sm_90a: on the GPU).
    artifact: PathBuf,
    /// Checkpoint to start from (HF layout); with --resume, the run's --out is read instead.
    #[arg(long, value_name = "DIR")]
    weights: PathBuf,
    #[command(flatten)]
    run: v3c_runtime::cli::TrainRunArgs,
    /// Tokens per sequence (default: the artifact's planned window, --max-rows at compile time).
    #[arg(long, value_name = "T")]
    seq: Option<usize>,
    /// CUDA device ordinal (GPU artifacts).
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
    /// GPU artifacts: AdamW on the host (every parameter uploaded and every gradient read back
    /// each step) instead of on the device, where the parameters and moments otherwise stay.
    #[arg(long)]
    host_optimizer: bool,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["weights", "random_weights"])))]
struct BenchArgs {
    /// Artifact directory written by `v3c compile`.
    artifact: PathBuf,
    /// Checkpoint directory in the Hugging Face layout (the kernels run on real weights).
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Made-up weights from this seed instead of a checkpoint (timing only; the inputs are zeros,
    /// so every token routes to the same experts).
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
    /// Entry point to time (default: all).
    #[arg(long, value_name = "NAME")]
    entry: Option<String>,
    /// Timed repetitions of each launch (after one warm-up).
    #[arg(long, value_parser = positive, value_name = "N", default_value_t = 20)]
    reps: usize,
    /// Write the timings as JSON here.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// CUDA device ordinal (GPU artifacts).
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
}

#[derive(Args)]
struct ChatArgs {
    /// Artifact directory written by `v3c compile` (cpu: runs here; sm_90a: on the GPU).
    artifact: PathBuf,
    /// Checkpoint directory in the Hugging Face layout (with its tokenizer.json and
    /// tokenizer_config.json's chat template, unless --tokenizer).
    #[arg(long, value_name = "DIR")]
    weights: PathBuf,
    #[command(flatten)]
    text: TextArgs,
    /// A system prompt before the conversation.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Prefill every turn whole (default: the earlier turns' cache pages shared).
    #[arg(long)]
    no_prefix_reuse: bool,
    /// Functions the model may call: a JSON file of OpenAI's `tools` (a list of {"type":
    /// "function", "function": {"name", "description", "parameters"}}), which the chat template
    /// describes. A call is printed as `tool call ID: NAME ARGUMENTS`; each call's output is then
    /// read as the next line of stdin, and the model goes on.
    #[arg(long, value_name = "FILE")]
    tools: Option<PathBuf>,
    /// When the model calls them: auto (it decides), none, required (every reply), or a
    /// function's name (every reply calls it).
    #[arg(long, value_name = "CHOICE", requires = "tools", default_value = "auto")]
    tool_choice: String,
    /// How the model writes tool calls.
    #[arg(long, value_enum, value_name = "PARSER", default_value = "deepseek-v3")]
    tool_call_parser: ToolCallParser,
    /// Tell the reasoning from the answer: deepseek-r1 — the text between <think> and </think>
    /// goes to stderr as it comes (dim on a terminal), the answer to stdout; only the answer is
    /// kept in the conversation (R1's template drops earlier turns' reasoning too), and tool
    /// calls are read from it. Needs a tokenizer with both markers.
    #[arg(long, value_enum, value_name = "PARSER")]
    reasoning_parser: Option<ReasoningParser>,
    /// Most tokens a reply, its sampling (each turn seeded with --seed plus its number).
    #[command(flatten)]
    generating: Generating,
    #[command(flatten)]
    speculating: Speculating,
    /// CUDA device ordinal (GPU artifacts).
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
}

#[derive(Args)]
struct PerplexityArgs {
    /// Artifact directory written by `v3c compile` (cpu: runs here; sm_90a: on the GPU).
    artifact: PathBuf,
    /// Checkpoint directory in the Hugging Face layout.
    #[arg(long, value_name = "DIR")]
    weights: PathBuf,
    /// The tokens: ids (whitespace-separated text or little-endian u32), or text with --tokenizer
    /// (a .jsonl file a document a line, {"text": ...}; documents one after another).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// A tokenizer.json (or a directory holding one) for text --data.
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// Tokens a window (default: the longest prompt the artifact's prefill takes).
    #[arg(long, value_name = "N")]
    window: Option<usize>,
    /// Tokens between windows' starts (default: --window; less: overlapping windows, each token
    /// scored with more context before it).
    #[arg(long, value_name = "N")]
    stride: Option<usize>,
    /// Score the first N tokens of --data only.
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    json: bool,
    /// Read every window's logits back and score them on the host, though a GPU artifact's
    /// scoring kernel would score them on the device (the same bits: 16 bytes a token read back,
    /// not the vocabulary's logits). For timing the two against each other.
    #[arg(long)]
    score_on_host: bool,
    /// CUDA device ordinal (GPU artifacts).
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
}

#[derive(Args)]
struct TokenizeArgs {
    /// A tokenizer.json, or a directory holding one (a checkpoint's).
    tokenizer: PathBuf,
    /// Texts to encode, one line of token ids each (none: all of stdin, as one text).
    text: Vec<String>,
    /// Decode instead: each argument is token ids separated by spaces, printed as its text.
    #[arg(long)]
    decode: bool,
    /// Encoding: leave out the special tokens the template adds (e.g. BOS); decoding: leave out
    /// special tokens.
    #[arg(long)]
    no_special_tokens: bool,
    /// A conversation written by the chat template (tokenizer_config.json's) and encoded, as a chat
    /// request's prompt is: a JSON file (`-`: stdin) of OpenAI's messages, or an object with
    /// "messages" and optionally "tools", "chat_template_kwargs", "add_generation_prompt" (true
    /// unless said) and "continue_final_message" (the final message left open, for the model to
    /// continue)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["text", "decode", "no_special_tokens"])]
    chat: Option<PathBuf>,
    /// With --chat: print the template's text instead of its token ids
    #[arg(long, requires = "chat")]
    render: bool,
    /// With --chat: this chat template (Jinja) instead of tokenizer_config.json's
    #[arg(long, value_name = "FILE", requires = "chat")]
    chat_template: Option<PathBuf>,
}

#[derive(Args)]
struct DoctorArgs {
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InfoArgs {
    /// Artifact directory written by `v3c compile` (holds manifest.json).
    artifact: PathBuf,
    /// CUDA device ordinal to check a GPU artifact against.
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
    /// Also check this checkpoint (HF layout) against every weight the plan binds: names, shapes, dtypes.
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    /// Artifact directory written by `v3c compile`.
    artifact: PathBuf,
    /// Checkpoint directory in the Hugging Face layout.
    #[arg(long, value_name = "DIR")]
    weights: PathBuf,
    /// Token ids separated by spaces, e.g. "0 3 17 250".
    #[arg(long, value_name = "IDS")]
    tokens: String,
    /// Output safetensors file.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// CUDA device ordinal (GPU artifacts).
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["weights", "random_weights"])))]
struct BenchDecodeArgs {
    /// Artifact directory written by `v3c compile`.
    artifact: PathBuf,
    /// Checkpoint directory in the Hugging Face layout.
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Made-up weights from this seed instead of a checkpoint (timing only: the tokens mean nothing).
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
    /// Sequences per decode step, comma-separated (each at most the plan's rows).
    #[arg(long, value_name = "B,..", value_delimiter = ',', default_values_t = [1usize, 64])]
    batch: Vec<usize>,
    /// Cache rows each sequence attends to, comma-separated (each at most the plan's context); every
    /// batch size is timed at every context.
    #[arg(long, value_name = "N,..", value_delimiter = ',', default_values_t = [4096usize])]
    context: Vec<usize>,
    /// Timed steps per batch size (after one warm-up); the median is reported.
    #[arg(long, value_parser = positive, value_name = "N", default_value_t = 20)]
    reps: usize,
    /// Write the figures as JSON here.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Time every launch of the decode entry, the MTP module's attention, experts and head too
    /// (a speculative session's draft logits; how steps were timed before 2026-12-05). By default
    /// a step runs what generation runs: the launches the logits and caches need.
    #[arg(long)]
    all_launches: bool,
    /// CUDA device ordinal (GPU artifacts).
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["weights", "random_weights"])))]
struct BenchPrefillArgs {
    /// Artifact directory written by `v3c compile`.
    artifact: PathBuf,
    /// Checkpoint directory in the Hugging Face layout.
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Made-up weights from this seed instead of a checkpoint (timing only: the tokens mean nothing).
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
    /// Tokens a chunk prefills, comma-separated (each at most the plan's rows, `v3c compile
    /// --max-rows`; default: the plan's rows).
    #[arg(long, value_name = "T,..", value_delimiter = ',')]
    tokens: Vec<usize>,
    /// Cache rows before the chunk (a long prompt's earlier chunks), comma-separated (each at most
    /// the plan's context); every chunk length is timed at every context.
    #[arg(long, value_name = "N,..", value_delimiter = ',', default_values_t = [0usize])]
    context: Vec<usize>,
    /// Seed of the random prompt tokens (with made-up weights they spread the tokens over the
    /// experts as a real prompt's do; one token repeated would route every row to the same ones).
    #[arg(long, value_name = "SEED", default_value_t = 0)]
    seed: u64,
    /// Timed chunks per point (after one warm-up); the median is reported.
    #[arg(long, value_parser = positive, value_name = "N", default_value_t = 10)]
    reps: usize,
    /// Write the figures as JSON here.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Time every launch of the prefill entry, each over the whole chunk: the MTP module's
    /// attention, experts and head, and the model head over every row (how chunks ran before
    /// 2026-12-06). By default a chunk runs what a prompt's last chunk runs: the launches its
    /// caches and its last row of logits need, the head on that row alone.
    #[arg(long)]
    all_launches: bool,
    /// Launch each GEMM's kernel picked for the plan's rows at every chunk length (as chunks ran
    /// before 2026-12-07). By default a chunk of T tokens launches the kernels `v3c compile` picked
    /// for the smallest power-of-two bucket that holds T (`v3r info` lists them: `prefill (up to N
    /// rows)`).
    #[arg(long)]
    plan_rows_kernels: bool,
    /// CUDA device ordinal (GPU artifacts).
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["weights", "random_weights"])))]
struct BenchServeArgs {
    /// Artifact directory written by `v3c compile`.
    artifact: PathBuf,
    /// Checkpoint directory in the Hugging Face layout.
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Made-up weights from this seed instead of a checkpoint (timing only: the tokens mean nothing).
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
    /// Requests in the run.
    #[arg(long, value_parser = positive, value_name = "N", default_value_t = 32)]
    requests: usize,
    /// At most N sequences decode together (default: the artifact's --max-batch).
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    #[command(flatten)]
    scheduling: Scheduling,
    /// Prompt lengths in tokens: uniform in LO..HI (both included), or one length.
    #[arg(long, value_name = "LO..HI", default_value = "64..512")]
    prompt_tokens: String,
    /// The requests from a file instead of random prompts — `v3r serve`'s request lines: token ids,
    /// or JSON with "prompt", "text" or "messages" (through the tokenizer: --tokenizer, or the
    /// checkpoint's) and its own "max_new_tokens" and sampling — taken in turn for --requests
    /// requests; those longer than the artifact serves are skipped (counted).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt_tokens", "shared_prefix"])]
    prompts: Option<PathBuf>,
    /// A tokenizer.json (or a directory holding one) for --prompts' text.
    #[arg(long, value_name = "FILE", requires = "prompts")]
    tokenizer: Option<PathBuf>,
    /// Every prompt starts with the same N tokens (a system prompt; a prompt shorter than N is
    /// all of it): what prefix reuse saves (--no-prefix-reuse to compare).
    #[arg(long, value_name = "N", default_value_t = 0)]
    shared_prefix: usize,
    /// New tokens per request (greedy; the end-of-sequence token does not stop it; --prompts'
    /// requests may say their own).
    #[arg(long, value_parser = positive, value_name = "N", default_value_t = 64)]
    new_tokens: usize,
    /// Requests arrive evenly spaced at this rate (per second); default: all at once.
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// Seed of the prompts (their lengths and tokens).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the figures (and every request's) as JSON here.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Decode steps run every slot's row, idle ones too (computed, ignored). By default a step
    /// over a pool of pages runs the decoding sequences' rows, and as few idle ones as make a power
    /// of two (a step staged per row count): this times what idle rows cost. Caches per sequence
    /// (cpu artifacts, `--decode-attention rows`) always run every slot.
    #[arg(long, conflicts_with = "speculative")]
    every_slot: bool,
    /// Generated requests sample at this temperature, every token weighed (each seeded with --seed
    /// plus its number); 0 is greedy. A GPU artifact draws the tokens on the device (the host's
    /// draws, bit for bit) unless --pick-on-host.
    #[arg(long, value_name = "T", default_value_t = 0.0)]
    temperature: f32,
    /// Generated requests ask for their tokens' log-probabilities, and the N most probable tokens'
    /// at each step (0: none; at most 20). A GPU artifact scores them on the device unless
    /// --pick-on-host (then every step's logits are read back and scored on the host).
    #[arg(long, value_name = "N")]
    logprobs: Option<usize>,
    /// Read every decode step's logits back and pick its tokens on the host (the same tokens): the
    /// A/B of the device's picks.
    #[arg(long)]
    pick_on_host: bool,
    #[command(flatten)]
    speculating: Speculating,
    /// CUDA device ordinal (GPU artifacts).
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["weights", "random_weights"])))]
struct BenchTrainArgs {
    /// Artifact directory written by `v3c compile --train` (cpu: runs here; sm_90a: on the GPU).
    artifact: PathBuf,
    /// Checkpoint to take the parameters from (HF layout).
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Made-up f32 parameters from this seed instead of a checkpoint (for full-width slices no
    /// checkpoint is at hand for).
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
    /// Windows (sequences) per optimizer step.
    #[arg(long, value_name = "B", default_value_t = 1)]
    batch: usize,
    /// Tokens per window (default: the artifact's planned window, --max-rows at compile time).
    #[arg(long, value_name = "T")]
    seq: Option<usize>,
    /// Optimizer steps; the first is a warm-up, the medians are of the others.
    #[arg(long, value_parser = positive, value_name = "N", default_value_t = 5)]
    steps: usize,
    /// Write every step's timings and the medians as JSON here.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// CUDA device ordinal (GPU artifacts).
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
    /// GPU artifacts: AdamW on the host (parameters uploaded, gradients read back each step)
    /// instead of on the device.
    #[arg(long)]
    host_optimizer: bool,
}

#[derive(Args)]
struct TuneArgs {
    /// Directory written by `v3c tune --emit-candidates` (candidates.json + kernels/).
    dir: PathBuf,
    /// Tuning database to write (entries of the same kernel, bucket, GPU and compiler replaced).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Timed launches per candidate (after two warm-ups); the median is recorded.
    #[arg(long, value_parser = positive, value_name = "N", default_value_t = 20)]
    reps: usize,
    /// CUDA device ordinal.
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
    /// Measure problems the database already holds for this GPU, compiler and candidate set too.
    #[arg(long)]
    again: bool,
}

/// How many tokens to generate and how to pick them (`v3r run`; what a `v3r serve` request does
/// not say).
#[derive(Args)]
struct Generating {
    /// How many tokens to generate after each prompt.
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[command(flatten)]
    shaping: v3c_runtime::cli::ShapingArgs,
    /// Seed of the sampler (each sequence has its own).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Read every decode step's logits back and pick its tokens on the host, though a GPU
    /// artifact's kernels would pick them on the device (greedy's argmax; sampling at a
    /// temperature, with top-k, top-p and min-p or every token weighed and nothing changing the
    /// logits, drawn as the host draws: the same tokens). For timing the two against each other.
    #[arg(long)]
    pick_on_host: bool,
}

impl Generating {
    /// Top-k, min-p and the penalties as given.
    fn shaping(&self) -> v3c_models::sampling::Shaping {
        self.shaping.shaping()
    }

    /// The flags are in range ("--min-p 2 must be in [0, 1]").
    fn check(&self) -> Result<(), Failure> {
        v3c_runtime::cli::check_sampling(self.temperature, self.top_p)
            .and_then(|()| self.shaping().check())
            .map_err(|e| Failure::Other(format!("--{e}")))
    }

    /// The tokens the flags name are within the vocabulary of the model `a` was compiled from.
    fn check_vocabulary(&self, a: &v3c_runtime::artifact::Artifact) -> Result<(), Failure> {
        let vocab = vocabulary(a);
        match self.shaping().logit_bias.iter().find(|(t, _)| *t as u64 >= vocab) {
            Some((t, _)) => Err(Failure::Other(format!(
                "--logit-bias: token id {t} is outside the model's vocabulary (0..{vocab})"
            ))),
            None => Ok(()),
        }
    }

    /// A sequence's sampler, seeded with `seed`.
    fn sampler(&self, seed: u64) -> v3c_models::reference::Sampler {
        v3c_models::reference::Sampler::new(self.temperature, self.top_p, seed).shaped(self.shaping())
    }
}

/// The model's vocabulary size as the artifact's config says (none said: no bound).
fn vocabulary(a: &v3c_runtime::artifact::Artifact) -> u64 {
    a.manifest.model.config.get("vocab_size").and_then(|v| v.as_u64()).unwrap_or(u64::MAX)
}

/// Where text is turned into tokens and back (`run`, `serve`).
#[derive(Args)]
struct TextArgs {
    /// A Hugging Face tokenizer.json (byte-level BPE, as DeepSeek-V3's), or a directory holding
    /// one, for prompts and stop strings given as text and completions printed as text (default:
    /// the checkpoint's tokenizer.json, when --weights has one).
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// A chat template (Jinja, as tokenizer_config.json's chat_template is) instead of the
    /// tokenizer's own, or for a tokenizer without one.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
}

/// How joining requests share the steps with the running ones (`run`, `serve`, `bench-serve`).
#[derive(Args)]
struct Scheduling {
    /// Prompt tokens joining requests prefill between two decode steps while sequences decode (in
    /// the prefill plan's chunks, at least one; default: one chunk): more shortens a joining
    /// request's wait for its first token, fewer the running ones' time per token.
    #[arg(long, value_name = "TOKENS")]
    prefill_budget: Option<usize>,
    /// Prefill every prompt token. By default a joining prompt holds the whole 64-row pages of
    /// cache rows it shares with a running or ended request's tokens instead of prefilling them
    /// (a shared system prompt is prefilled once and held once; an ended request's pages are kept
    /// until the pool needs them). Decode caches in a pool of pages only (sm_90a's tensor-core
    /// decode).
    #[arg(long)]
    no_prefix_reuse: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// Artifact directory written by `v3c compile` (its decode entry over a pool of cache pages:
    /// the default tensor-core attention on sm_90a; cpu artifacts too).
    artifact: PathBuf,
    /// Checkpoint directory in the Hugging Face layout (config.json + *.safetensors).
    #[arg(long, value_name = "DIR")]
    weights: PathBuf,
    /// At most N sequences decode together (default: the artifact's --max-batch).
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    #[command(flatten)]
    scheduling: Scheduling,
    /// What a request does not say (its max_new_tokens, temperature, top_p, seed).
    #[command(flatten)]
    generating: Generating,
    #[command(flatten)]
    text: TextArgs,
    /// Also a JSON line {"id": ..., "token": T} for every token as it is picked (with a tokenizer,
    /// also "text": the text it settles).
    #[arg(long, conflicts_with = "http")]
    stream: bool,
    /// Serve over HTTP on this address (e.g. 127.0.0.1:8000; port 0 picks one, said on stderr)
    /// instead of stdin: OpenAI's completions API — POST /v1/completions {"prompt": "text" or
    /// [ids], "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs", "stream"}
    /// (server-sent events with "stream": true), POST /v1/chat/completions {"messages": [...],
    /// "tools": [...], "response_format": ..., ...} (with the tokenizer's chat template), the
    /// Responses API's POST /v1/responses {"input": ..., "instructions", "tools", "text": {"format"},
    /// "max_output_tokens", "stream", "previous_response_id"} (responses kept in memory, the last
    /// 1024; GET and DELETE /v1/responses/ID), Anthropic's POST
    /// /v1/messages {"messages", "system", "max_tokens", "tools", "stream", ...}, vLLM's POST
    /// /tokenize and /detokenize, GET /v1/models, GET /health, GET /metrics. Runs until SIGTERM
    /// or Ctrl-C: then it takes no new requests (503; GET /health 503), lets those running end,
    /// and exits; a second signal ends it at once.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// With --http: every request but GET /health must carry `Authorization: Bearer KEY` (or
    /// Anthropic's `x-api-key: KEY`; else 401). Default: the V3R_API_KEY environment variable, where set (no key shown in ps).
    #[arg(long, value_name = "KEY", requires = "http")]
    api_key: Option<String>,
    /// With --http: the model's name in replies and GET /v1/models (default: the name the
    /// artifact was compiled from, e.g. a checkpoint's path).
    #[arg(long, value_name = "NAME", requires = "http")]
    served_model_name: Option<String>,
    /// Tell a chat's reasoning from its answer: deepseek-r1 — the text between <think> and
    /// </think> (R1's template opens the <think> itself) is the reply's `reasoning_content`
    /// (streamed: `delta.reasoning_content`), the rest its `content`. Needs a tokenizer with both.
    #[arg(long, value_enum, value_name = "PARSER")]
    reasoning_parser: Option<ReasoningParser>,
    /// How the model writes tool calls (requests' `tools`).
    #[arg(long, value_enum, value_name = "PARSER", default_value = "deepseek-v3")]
    tool_call_parser: ToolCallParser,
    #[command(flatten)]
    speculating: Speculating,
    /// CUDA device ordinal (GPU artifacts).
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
}

/// How a model writes tool calls.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ToolCallParser {
    /// DeepSeek-V3's: `function<｜tool▁sep｜>NAME`, then the arguments in a fenced JSON block.
    #[value(name = "deepseek-v3", alias = "deepseek_v3")]
    DeepseekV3,
    /// DeepSeek-V3.1's: `NAME<｜tool▁sep｜>ARGUMENTS`.
    #[value(name = "deepseek-v3.1", alias = "deepseek_v31")]
    DeepseekV31,
}

impl ToolCallParser {
    fn format(self) -> v3c_runtime::tools::ToolFormat {
        match self {
            ToolCallParser::DeepseekV3 => v3c_runtime::tools::ToolFormat::DeepSeekV3,
            ToolCallParser::DeepseekV31 => v3c_runtime::tools::ToolFormat::DeepSeekV31,
        }
    }
}

/// How a chat's reasoning is told from its answer.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ReasoningParser {
    /// DeepSeek-R1's <think> ... </think>.
    #[value(name = "deepseek-r1", alias = "deepseek_r1")]
    DeepseekR1,
}

#[derive(Args)]
struct RunArgs {
    /// Artifact directory written by `v3c compile`.
    artifact: PathBuf,
    /// Checkpoint directory in the Hugging Face layout (config.json + *.safetensors).
    #[arg(long, value_name = "DIR")]
    weights: PathBuf,
    /// Prompt as token ids separated by spaces, e.g. "0 3 17 250". Repeat it to generate for several
    /// prompts in one batch (one line of tokens each, in order).
    #[arg(long, value_name = "IDS", required_unless_present_any = ["prompts_file", "prompt", "chat"])]
    prompt_tokens: Vec<String>,
    /// Prompt as text, encoded by the tokenizer (its template's special tokens, e.g. DeepSeek-V3's
    /// BOS, added); after any --prompt-tokens. Prints the completion as text: as it is for one
    /// prompt (as it is generated), one JSON string a line for several.
    #[arg(long, value_name = "TEXT")]
    prompt: Vec<String>,
    /// A user's message, written by the tokenizer's chat template (tokenizer_config.json's
    /// chat_template) with the assistant's turn opened; after any --prompt. Prints the reply as
    /// --prompt prints a completion.
    #[arg(long, value_name = "MESSAGE")]
    chat: Vec<String>,
    #[command(flatten)]
    text: TextArgs,
    /// A file of prompts, one a line (token ids separated by spaces; blank lines skipped), after
    /// any --prompt-tokens: one line of generated tokens each, in order.
    #[arg(long, value_name = "FILE")]
    prompts_file: Option<PathBuf>,
    /// At most N sequences decode together (default: every prompt, up to the artifact's
    /// --max-batch). More prompts wait, and each joins the running batch as a sequence ends —
    /// prefilled, its caches moved to the pages the ended one gave back — once the pool of
    /// cache pages has room for its prompt and new tokens.
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    #[command(flatten)]
    scheduling: Scheduling,
    #[command(flatten)]
    generating: Generating,
    #[command(flatten)]
    speculating: Speculating,
    /// CUDA device ordinal (GPU artifacts).
    #[arg(long, value_name = "ORDINAL", default_value_t = 0)]
    device: usize,
}

/// Speculative decoding with the MTP module.
#[derive(Args)]
struct Speculating {
    /// Speculative decoding with the MTP module (an artifact compiled with `v3c compile
    /// --speculative`): each pass of the main model verifies the MTP module's drafts of the next
    /// tokens and yields one token more than it accepts. Greedy: a draft is accepted when it is
    /// the main model's own token; with --temperature / --top-p, by speculative sampling (tokens
    /// distributed as plain sampling's; penalties, logit bias and response formats shape both as
    /// they would plain decoding). One sequence at a time: prompts and requests in turn. Says the
    /// drafts' acceptance.
    #[arg(long)]
    speculative: bool,
    /// MTP drafts a pass of the main model verifies with --speculative: the first from the main
    /// model's hidden state, each next one from the MTP module fed its own hidden state back
    /// (more tokens a pass while they are accepted, a longer pass to verify them).
    #[arg(long, value_parser = positive, value_name = "K", default_value_t = 1, requires = "speculative")]
    draft_tokens: usize,
}

impl Speculating {
    /// MTP drafts a pass, where speculative.
    fn drafts(&self) -> Option<usize> {
        self.speculative.then_some(self.draft_tokens)
    }

    /// What runs (`kind`), with the drafts a pass where speculative — once `program` is checked
    /// to have what speculative decoding needs.
    fn said(&self, program: &dyn v3c_runtime::session::Program, kind: String) -> Result<String, String> {
        let Some(k) = self.drafts() else { return Ok(kind) };
        v3c_runtime::speculative::check(program, k)?;
        Ok(format!("{kind}, speculative: {k} MTP draft(s) a pass"))
    }

    /// `batch` (sequences decoding together, where given) with --speculative: one at most.
    fn check_batch(&self, batch: Option<usize>) -> Result<(), Failure> {
        match batch {
            Some(n) if n > 1 && self.speculative => Err(Failure::Other(format!(
                "--batch {n} with --speculative: speculative decoding generates one sequence at a time (--batch 1)"
            ))),
            _ => Ok(()),
        }
    }
}

fn main() -> ExitCode {
    let cli: Cli = v3c_runtime::cli::parse_or_exit("v3r");
    v3c_runtime::cli::init_logging(cli.verbose);
    let result = match cli.command {
        Command::Doctor(a) => doctor(&a).map_err(Failure::Other),
        Command::Info(a) => info(&a).map_err(Failure::Other),
        Command::Run(a) => run(&a),
        Command::Serve(a) => serve(&a),
        Command::Logits(a) => logits(&a),
        Command::Tokenize(a) => tokenize(&a).map_err(Failure::Other),
        Command::Perplexity(a) => perplexity(&a),
        Command::Chat(a) => chat(&a),
        Command::BenchDecode(a) => bench_decode(&a),
        Command::BenchPrefill(a) => bench_prefill(&a),
        Command::BenchServe(a) => bench_serve(&a),
        Command::Tune(a) => tune(&a),
        Command::BenchKernels(a) => bench_kernels(&a),
        Command::BenchTrain(a) => bench_train(&a),
        Command::Train(a) => train(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Other(msg)) => {
            eprintln!("v3r: error: {msg}");
            ExitCode::FAILURE
        }
        Err(Failure::NoDevice(msg)) => {
            eprintln!("v3r: error: {msg}");
            ExitCode::from(NO_DEVICE_EXIT)
        }
    }
}

/// Exit code of a command that needs a GPU on a machine without one (no driver, no device).
const NO_DEVICE_EXIT: u8 = 3;

enum Failure {
    /// No CUDA driver or device: exit 3.
    NoDevice(String),
    Other(String),
}

fn doctor(args: &DoctorArgs) -> Result<(), String> {
    let probe = device::probe_devices();
    if args.json {
        let value = match &probe {
            Ok((driver, devices)) => serde_json::json!({
                "v3r_version": env!("CARGO_PKG_VERSION"),
                "driver": driver.version.to_string(),
                "devices": devices.iter().map(|d| serde_json::json!({
                    "ordinal": d.ordinal,
                    "name": d.name,
                    "compute_capability": [d.compute_capability.0, d.compute_capability.1],
                    "total_memory_bytes": d.total_memory_bytes,
                    "multiprocessors": d.multiprocessors,
                })).collect::<Vec<_>>(),
            }),
            Err(e) => serde_json::json!({
                "v3r_version": env!("CARGO_PKG_VERSION"),
                "driver": serde_json::Value::Null,
                "devices": [],
                "problem": e.to_string(),
            }),
        };
        println!("{value}");
        return Ok(());
    }
    println!("v3r {} (runtime; links no compiler)", env!("CARGO_PKG_VERSION"));
    match probe {
        Ok((driver, devices)) => {
            println!("CUDA driver: found, supports CUDA {}", driver.version);
            for d in &devices {
                let note =
                    if d.compute_capability == (9, 0) { "" } else { "  [not Hopper: sm_90a artifacts will not run]" };
                println!("GPU: {d}{note}");
            }
        }
        Err(e @ device::DeviceError::NoDriver) => {
            println!("CUDA driver: not found; {e}");
            println!("GPU: none (compiling works; running artifacts needs a GPU machine)");
        }
        Err(e) => {
            println!("CUDA driver: {e}");
            println!("GPU: none");
        }
    }
    Ok(())
}

fn info(args: &InfoArgs) -> Result<(), String> {
    use v3c_runtime::artifact::Artifact;
    let a = Artifact::open(&args.artifact).map_err(|e| e.to_string())?;
    let m = &a.manifest;
    let mut out = String::new();
    let mut j = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        j.insert(k.to_string(), v);
    };
    put("artifact", a.dir.display().to_string().into());
    put("format_version", m.format_version.into());
    put("compiler", serde_json::json!({ "version": m.compiler.version, "git_hash": m.compiler.git_hash }));
    put(
        "model",
        serde_json::json!({ "name": m.model.name, "precision": m.model.precision, "config_sha256": m.model.config_sha256 }),
    );
    put("target", serde_json::to_value(&m.target).unwrap_or_default());
    put("tuning", serde_json::to_value(&m.tuning).unwrap_or_default());
    put("kernels", m.kernels.len().into());
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("artifact: {}", a.dir.display()));
    line(format!("format: {} (compiled by v3c {}, git {})", m.format_version, m.compiler.version, m.compiler.git_hash));
    line(format!(
        "model: {} ({} graph), config sha256 {}",
        m.model.name,
        m.model.precision,
        &m.model.config_sha256[..16.min(m.model.config_sha256.len())]
    ));
    let target = match (&m.target.arch, m.target.compute_capability) {
        (Some(arch), _) => format!("{} ({arch}; features {})", m.target.name, m.target.cpu_features.join(" ")),
        (None, Some(cc)) => format!("{} (compute capability {}.{})", m.target.name, cc.0, cc.1),
        _ => m.target.name.clone(),
    };
    line(format!("target: {target}"));
    let mut entries = Vec::new();
    for e in &a.plan.entries {
        let weights =
            e.buffers.iter().filter(|b| matches!(b.kind, v3c_runtime::plan::BufferKind::Weight { .. })).count();
        let cache = e.buffers.iter().find_map(|b| match &b.kind {
            v3c_runtime::plan::BufferKind::Input { name } if name.starts_with("kv_cache.") => Some(b.dtype.clone()),
            _ => None,
        });
        let mut entry = serde_json::json!({
            "name": e.name, "launches": e.launches.len(), "weights": weights, "arena_bytes": e.arena_bytes,
            "rows": e.sizes.rows, "context": e.sizes.context, "cache_element": cache,
        });
        if e.bounds.contains_key(v3c_runtime::plan::PAGE_POOL) {
            entry["cache_pool_pages"] = e.sizes.pages.into();
        }
        // What a prompt's last chunk runs: its caches and the last row of its logits.
        let last_chunk = (e.name == "prefill" && e.outputs.iter().any(|(n, _)| n == "logits")).then(|| {
            let caches: Vec<&str> =
                e.outputs.iter().map(|(n, _)| n.as_str()).filter(|n| n.starts_with("kv_cache.")).collect();
            let short = e.needing(&caches, &["logits"]);
            let launches = short.as_ref().map_or(&e.launches, |p| &p.launches);
            let on_row: Vec<&str> = launches.iter().filter(|l| l.last_row).map(|l| l.kernel.as_str()).collect();
            (launches.len(), on_row.join(", "))
        });
        if let Some((launches, on_row)) = &last_chunk {
            entry["last_chunk"] = serde_json::json!({ "launches": launches, "on_last_row": on_row });
        }
        entries.push(entry);
        // Caches other than f32: how the entry's attention reads them.
        let pages = a.lowering.as_ref().and_then(|l| l.cache_rows_multiple);
        let fp8_row = e.buffers.iter().find_map(|b| match &b.kind {
            v3c_runtime::plan::BufferKind::Input { name } if name.starts_with("kv_cache.") => {
                b.shape.last().copied().and_then(v3c_runtime::plan::Fp8LatentRow::of)
            }
            _ => None,
        });
        let cache = match (cache.as_deref(), fp8_row) {
            (Some(v3c_runtime::plan::LATENT_FP8), Some(row)) => {
                Some(format!("fp8 ({}-byte rows: e4m3 latent, power-of-two scales, bf16 rope key)", row.bytes()))
            }
            _ => cache,
        };
        let cache = match (cache.as_deref(), pages) {
            (None | Some("f32"), _) => String::new(),
            (Some(c), Some(rows)) if e.bounds.contains_key(v3c_runtime::plan::PAGE_POOL) => {
                format!(", caches {c}: a pool of {} pages of {rows} rows, a block table per sequence", e.sizes.pages)
            }
            (Some(c), Some(rows)) if e.name == "decode" => format!(", caches {c} in pages of {rows} rows"),
            (Some(c), _) => format!(", caches {c}"),
        };
        let what = if e.name == "decode" { "sequences" } else { "tokens" };
        line(format!(
            "entry {}: {} launches, {} weights, arena {:.1} MiB for {} {what} and {} cache rows{cache}",
            e.name,
            e.launches.len(),
            weights,
            e.arena_bytes as f64 / (1u64 << 20) as f64,
            e.sizes.rows,
            e.sizes.context
        ));
        if let Some((launches, on_row)) = last_chunk {
            let on_row = if on_row.is_empty() { "none".to_string() } else { on_row };
            line(format!(
                "  a prompt's last chunk (its caches, its last row of logits): {launches} launches, on its last \
                 row alone: {on_row}"
            ));
        }
    }
    put("entries", entries.into());
    line(format!("kernels: {} (every file's sha256 verified)", m.kernels.len()));
    if let Some(l) = &a.lowering {
        let launches: usize = l.kernels.iter().map(|k| k.launches.len()).sum();
        let tables = l.kernels.iter().filter(|k| k.rope_table.is_some()).count();
        let one_regime: usize = l.kernels.iter().map(|k| k.launches.iter().filter(|s| s.only.is_some()).count()).sum();
        let one_regime = match one_regime {
            0 => String::new(),
            n => format!(", {n} in one regime only"),
        };
        line(format!(
            "lowering: {} fused kernels as {launches} launches ({} with temporaries, {tables} reading a RoPE \
             table{one_regime})",
            l.kernels.len(),
            l.kernels.iter().filter(|k| !k.temps.is_empty()).count()
        ));
        // What decode's tokens are picked by where the logits stay on the device.
        let picks = [("greedy", &l.argmax), ("sampled", &l.sample)];
        let picks: Vec<String> =
            picks.iter().filter_map(|(what, k)| k.as_ref().map(|k| format!("{what} by {k}"))).collect();
        put("device_picks", serde_json::json!({ "argmax": l.argmax, "sample": l.sample }));
        if !picks.is_empty() {
            line(format!("tokens picked on the device: {}", picks.join(", ")));
        }
        put("device_scores", serde_json::json!(l.scores));
        if let Some(k) = &l.scores {
            line(format!("tokens scored on the device (perplexity): by {k}"));
        }
    }
    if m.target.name == "cpu" {
        // Every launch against the signature its kernel's code holds, read without loading it.
        let launches = v3c_runtime::cpu::check_signatures(&a)?;
        put("launch_check", serde_json::json!({ "checked": true, "launches": launches, "kernels": m.kernels.len() }));
        line(format!(
            "launches: {launches} launches of {} kernels at the planned sizes, each as its kernel's code says it takes",
            m.kernels.len()
        ));
    }
    if a.lowering.is_some() {
        // Every launch the executor would make, checked without a device.
        match v3c_runtime::gpu::Expander::new(&a) {
            Err(why) => {
                put("launch_check", serde_json::json!({ "checked": false, "why": why }));
                line(format!("launches: not checked ({why})"))
            }
            Ok(expander) => {
                let c = expander.check(&[])?;
                put(
                    "launch_check",
                    serde_json::json!({
                        "checked": true, "launches": c.launches, "kernels": c.kernels, "smaller_runs": c.smaller_runs,
                        "device_bytes": { "weights": c.weight_bytes, "relaid": c.prepared_bytes,
                                          "arena": c.arena_bytes, "inputs": c.input_bytes,
                                          "temporaries": c.temp_bytes },
                    }),
                );
                let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                let smaller = match c.smaller_runs {
                    0 => String::new(),
                    n => format!(" and {n} smaller prefill runs' (where GEMMs take kernels picked for fewer rows)"),
                };
                line(format!(
                    "launches: {} template launches of {} kernels at the planned sizes{smaller}, each as its PTX declares",
                    c.launches, c.kernels
                ));
                line(format!(
                    "device memory: {:.2} GiB weights + {:.2} GiB re-laid out, arena {:.1} MiB, inputs {:.1} MiB, \
                     temporaries {:.1} MiB",
                    gib(c.weight_bytes),
                    gib(c.prepared_bytes),
                    c.arena_bytes as f64 / (1u64 << 20) as f64,
                    c.input_bytes as f64 / (1u64 << 20) as f64,
                    c.temp_bytes as f64 / (1u64 << 20) as f64
                ));
                if let Some(o) = a.lowering.as_ref().and_then(|l| l.optimizer.as_ref()) {
                    // The trained parameters are the step's f32 weights: bf16 m and v take as many bytes.
                    put("optimizer", serde_json::to_value(o).unwrap_or_default());
                    let total = c.weight_bytes + c.prepared_bytes + c.arena_bytes + c.input_bytes + c.temp_bytes;
                    line(format!(
                        "optimizer: AdamW on the device ({}, {} elements a block): + {:.2} GiB of bf16 moments \
                         ({:.2} GiB in all), + {:.2} GiB more for steps of several windows; `v3r train \
                         --host-optimizer` keeps them on the host",
                        o.adamw,
                        o.chunk,
                        gib(c.weight_bytes),
                        gib(total + c.weight_bytes),
                        gib(c.weight_bytes)
                    ));
                }
            }
        }
    }
    line(format!(
        "tuning: {}{}",
        m.tuning.source,
        if m.tuning.detail.is_empty() { String::new() } else { format!(" ({})", m.tuning.detail) }
    ));
    for c in &m.tuning.choices {
        // The source's first clause: `tuning database: 0.0150 ms measured on H200 ...` or `cost model: ...`.
        let source = c.source.split(" at ").next().unwrap_or_default();
        let regime = match c.up_to_rows {
            Some(rows) => format!("{} (up to {rows} rows)", c.regime),
            None => c.regime.clone(),
        };
        line(format!("  {regime} {} [{}] -> {} ({source})", c.kernel, c.signature, c.config));
    }
    if let Some(t) = &m.training {
        put("training", serde_json::to_value(t).unwrap_or_default());
        let how = if m.target.name == "cpu" { "run it with `v3r train`" } else { "run it with `v3r train` on the GPU" };
        // Attention's gradient on the flash kernels: q, k, v, P and dS in bf16.
        let flash = m.kernels.iter().any(|k| k.name.starts_with("mla_grad"));
        line(format!(
            "training: MTP loss weight {}, balance loss alpha {}, {}{} ({how})",
            t.mtp_weight,
            t.balance_alpha,
            if t.fp8 { "FP8 recipe" } else { "f32" },
            if flash { ", attention in bf16 on the flash kernels" } else { "" }
        ));
    }
    match a.runs_here(args.device) {
        Ok(why) => {
            put("runs_here", serde_json::json!({ "yes": true, "why": why }));
            line(format!("runs here: yes ({why})"))
        }
        Err(why) => {
            put("runs_here", serde_json::json!({ "yes": false, "why": why }));
            line(format!("runs here: no ({why})"))
        }
    }
    if let Some(w) = &args.weights {
        let n = a.check_weights(w)?;
        put("weights", serde_json::json!({ "checkpoint": w.display().to_string(), "bindings": n }));
        line(format!("weights: {} matches the plan ({n} weight bindings: names, shapes, dtypes)", w.display()));
    }
    if args.json {
        println!("{}", serde_json::Value::Object(j));
    } else {
        print!("{out}");
    }
    Ok(())
}

fn bench_kernels(args: &BenchArgs) -> Result<(), Failure> {
    use v3c_runtime::artifact::Artifact;
    let a = Artifact::open(&args.artifact).map_err(|e| Failure::Other(e.to_string()))?;
    let names: Vec<String> = match &args.entry {
        Some(e) => vec![e.clone()],
        None => a.plan.entries.iter().map(|e| e.name.clone()).collect(),
    };
    let target = a.manifest.target.name.clone();
    type Bench = Box<dyn Fn(&str, usize) -> Result<Vec<v3c_runtime::cpu::KernelTiming>, String>>;
    let source = WeightSource::open(&a, args.weights.as_deref(), args.random_weights)?;
    let weights = source.weights();
    let bench: Bench = if target == "cpu" {
        let program = v3c_runtime::cpu::CpuArtifact::load_weights(a, &weights).map_err(Failure::Other)?;
        Box::new(move |entry, reps| program.bench_kernels(entry, reps))
    } else {
        device::probe_device(args.device).map_err(|e| Failure::NoDevice(e.to_string()))?;
        let program = v3c_runtime::cuda::GpuArtifact::load_weights(a, &weights, args.device, &mut |what| {
            tracing::debug!("{what}");
        })
        .map_err(Failure::Other)?;
        Box::new(move |entry, reps| program.bench_kernels(entry, reps))
    };
    let mut report = serde_json::Map::new();
    for entry in &names {
        let timings = bench(entry, args.reps.max(1)).map_err(Failure::Other)?;
        let total: f64 = timings.iter().map(|t| t.total_ms).sum();
        println!(
            "entry {entry}: {total:.3} ms per run ({} kernels, median of {} repetitions)",
            timings.len(),
            args.reps
        );
        for t in &timings {
            println!(
                "  {:28} {:4} launches  {:9.4} ms each  {:9.3} ms  {:5.1}%",
                t.kernel,
                t.launches,
                t.median_ms,
                t.total_ms,
                100.0 * t.total_ms / total.max(f64::MIN_POSITIVE)
            );
        }
        report.insert(entry.clone(), serde_json::to_value(&timings).map_err(|e| Failure::Other(e.to_string()))?);
    }
    if let Some(out) = &args.out {
        let json = serde_json::json!({
            "artifact": args.artifact.display().to_string(),
            "target": target,
            "reps": args.reps,
            "entries": report,
        });
        let text = serde_json::to_string_pretty(&json).map_err(|e| Failure::Other(e.to_string()))? + "\n";
        std::fs::write(out, text).map_err(|e| Failure::Other(format!("{}: {e}", out.display())))?;
    }
    Ok(())
}

/// An artifact to generate with on device `ordinal` (checked there first, before anything reads
/// the checkpoint, which may be hundreds of GiB) and the checkpoint's directory.
fn open_to_generate(
    artifact: &std::path::Path,
    weights: &std::path::Path,
    ordinal: usize,
) -> Result<v3c_runtime::artifact::Artifact, Failure> {
    let a = v3c_runtime::artifact::Artifact::open(artifact).map_err(|e| Failure::Other(e.to_string()))?;
    if a.manifest.target.name != "cpu" {
        device::probe_device(ordinal).map_err(|e| Failure::NoDevice(e.to_string()))?;
        a.runs_here(ordinal).map_err(Failure::Other)?;
    }
    if !weights.is_dir() {
        return Err(Failure::Other(format!("{}: no such checkpoint directory", weights.display())));
    }
    Ok(a)
}

/// The artifact's end-of-sequence token (None with `ignore`).
fn eos_of(a: &v3c_runtime::artifact::Artifact, ignore: bool) -> Option<u32> {
    match ignore {
        true => None,
        false => a.manifest.model.config.get("eos_token_id").and_then(|v| v.as_u64()).map(|v| v as u32),
    }
}

fn serve(args: &ServeArgs) -> Result<(), Failure> {
    use v3c_runtime::session::Arrival;
    args.generating.check()?;
    if args.generating.shaping.guided() {
        let per = "each request's response_format, guided_json, guided_regex or guided_choice";
        return Err(Failure::Other(format!("--json, --json-schema, --guided-regex, --guided-choice: in serve, {per}")));
    }
    if args.batch == Some(0) {
        return Err(Failure::Other("--batch 0: at least one sequence decodes at a time".into()));
    }
    args.speculating.check_batch(args.batch)?;
    // Bound before anything loads: a taken port is said at once.
    let listener = match &args.http {
        Some(addr) => {
            Some(std::net::TcpListener::bind(addr).map_err(|e| Failure::Other(format!("--http {addr}: {e}")))?)
        }
        None => None,
    };
    let a = open_to_generate(&args.artifact, &args.weights, args.device)?;
    args.generating.check_vocabulary(&a)?;
    a.check_weights(&args.weights).map_err(Failure::Other)?;
    let tokenizer = text_tokenizer(&args.text, &args.weights, false)?;
    if args.reasoning_parser.is_some() {
        let t = tokenizer.as_ref().ok_or_else(|| {
            Failure::Other("--reasoning-parser: needs a tokenizer (--tokenizer, or tokenizer.json in --weights)".into())
        })?;
        v3c_runtime::reasoning::Reasoning::new(t, &[])
            .map_err(|e| Failure::Other(format!("--reasoning-parser: {e}")))?;
    }
    let eos = eos_of(&a, args.generating.ignore_eos);
    let model = args.served_model_name.clone().unwrap_or_else(|| a.manifest.model.name.clone());
    let (program, kind) = load_program(a, &args.weights, args.device, args.generating.pick_on_host)?;
    let program = program.as_ref();
    let at = |e: String| Failure::Other(format!("{}: {e}", args.artifact.display()));
    let drafts = args.speculating.drafts();
    let kind = args.speculating.said(program, kind).map_err(at)?;
    let (max_len, max_prompt, rows) = serving_limits(program, drafts).map_err(at)?;
    let slots = args.batch.unwrap_or(rows);
    let defaults = v3c_runtime::cli::RequestDefaults {
        max_new: args.generating.max_new_tokens,
        temperature: args.generating.temperature,
        top_p: args.generating.top_p,
        seed: args.generating.seed,
        shaping: args.generating.shaping(),
        eos,
        reasoning: args.reasoning_parser.is_some(),
        tool_format: args.tool_call_parser.format(),
    };
    let limits = vec![max_len; slots];
    let serving = v3c_runtime::session::Serving {
        prefill_budget: args.scheduling.prefill_budget,
        reuse_prefixes: !args.scheduling.no_prefix_reuse,
        speculative: drafts,
        ..v3c_runtime::session::Serving::new(slots, &limits, max_prompt, eos)
    };
    if let Some(listener) = listener {
        let addr = listener.local_addr().map_err(|e| Failure::Other(e.to_string()))?;
        let api_key = args.api_key.clone().or_else(|| std::env::var("V3R_API_KEY").ok().filter(|k| !k.is_empty()));
        let key = if api_key.is_some() { ", an API key needed" } else { "" };
        let text = match &tokenizer {
            None => "token ids only: no tokenizer".to_string(),
            Some(t) if t.has_chat_template() => "text and chat".to_string(),
            Some(_) => "text; no chat template, so no chat".to_string(),
        };
        let chat = if tokenizer.as_ref().is_some_and(|t| t.has_chat_template()) {
            ", POST /v1/chat/completions, POST /v1/responses, POST /v1/messages"
        } else {
            ""
        };
        eprintln!(
            "serving {model} on http://{addr} (POST /v1/completions{chat}, GET /v1/models, GET /health; {slots} at a \
             time, {text}{key}, {kind})"
        );
        let start = std::time::Instant::now();

        let metrics = Default::default();
        let responses = Default::default();
        let site =
            v3c_runtime::http::Site { defaults, tokenizer, model: model.clone(), api_key, max_len, metrics, responses };
        // SIGTERM or Ctrl-C: no new requests, those running end, then the process (a second ends it at once).
        let interrupt = v3c_runtime::interrupt::Interrupt::install(&[libc::SIGINT, libc::SIGTERM]);
        let served =
            v3c_runtime::http::serve_http(listener, program, &serving, site, &|| interrupt.happened()).map_err(at)?;
        eprintln!(
            "served {} requests, {} tokens in {:.3} s ({} joined a running batch, {:.3} s in prefills)",
            served.requests,
            served.tokens,
            start.elapsed().as_secs_f64(),
            served.joined,
            served.prefill_s
        );
        return Ok(());
    }
    // Lines from stdin as they come, with when they came (a request queued behind others counts
    // its wait from then); a request's id is its own or its line's number.
    let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, String)>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            if line.map(|l| tx.send((std::time::Instant::now(), l))).is_err() {
                break;
            }
        }
    });
    let ids = std::cell::RefCell::new(Vec::new());
    // Per request, with a tokenizer: it and the request's stop strings, and its text so far.
    let texts = std::cell::RefCell::new(Vec::new());
    // Per request, the tools it may call and how its completion parts into reasoning and answer.
    let tools = std::cell::RefCell::new(Vec::new());
    let mut so_far = std::collections::HashMap::new();
    let mut scored = std::collections::HashMap::new();
    let (mut line_no, mut refused, mut served, mut cancelled, mut tokens) = (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut reused = 0usize;
    // Speculative: the drafts of every request together, and their tokens after the first.
    let (mut drafted, mut later) = (v3c_runtime::session::Speculated::default(), 0usize);
    // A line of stdout; a reader that went away (a closed pipe) ends the serving.
    let reply = |v: serde_json::Value| -> Result<(), String> {
        use std::io::Write;
        writeln!(std::io::stdout().lock(), "{v}").map_err(|e| format!("writing a reply to stdout: {e}"))
    };
    let micro = |x: f64| (x * 1e6).round() / 1e6;
    let start = std::time::Instant::now();
    let mut next = |idle: bool| loop {
        let (came, line) = match idle {
            true => match rx.recv() {
                Ok(l) => l,
                Err(_) => return Arrival::Closed,
            },
            false => match rx.try_recv() {
                Ok(l) => l,
                Err(std::sync::mpsc::TryRecvError::Empty) => return Arrival::NotYet,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return Arrival::Closed,
            },
        };
        line_no += 1;
        if line.trim().is_empty() {
            continue;
        }
        if let Some(target) = v3c_runtime::cli::parse_cancel(&line) {
            // The latest request of that id.
            if let Some(i) = ids.borrow().iter().rposition(|id| *id == target) {
                return Arrival::Cancel(i);
            }
            let error = format!("line {line_no}: cancel: no request has the id {target}");
            if reply(serde_json::json!({"id": target, "error": error})).is_err() {
                return Arrival::Closed;
            }
            continue;
        }
        match v3c_runtime::cli::parse_request(&line, &defaults, tokenizer.as_ref()) {
            Ok((id, r)) => {
                ids.borrow_mut().push(id.unwrap_or(serde_json::json!(line_no)));
                texts.borrow_mut().push(tokenizer.as_ref().map(|t| (t.clone(), r.stop_text.clone())));
                tools.borrow_mut().push((r.tools.clone(), r.reasoning));
                return Arrival::Request(v3c_runtime::session::Request { arrived: Some(came), ..r });
            }
            Err(e) => {
                refused += 1;
                if reply(serde_json::json!({"id": line_no, "error": format!("line {line_no}: {e}")})).is_err() {
                    return Arrival::Closed;
                }
            }
        }
    };
    let mut done = |i: usize, p: v3c_runtime::session::Progress| -> Result<(), String> {
        use v3c_runtime::session::Progress;
        let id = ids.borrow().get(i).cloned().unwrap_or(serde_json::Value::Null);
        let text_of = |tokens: &[u32]| {
            let texts = texts.borrow();
            let (t, stops) = texts.get(i)?.as_ref()?;
            Some(v3c_runtime::session::generation_text(t, tokens, stops.as_ref()))
        };
        match p {
            // The next token's line carries them.
            Progress::Scored(lp, alts) if args.stream => _ = scored.insert(i, (lp, alts)),
            Progress::Scored(..) => {}
            Progress::Token(t) if args.stream => {
                let mut line = serde_json::json!({"id": id, "token": t});
                if let Some((lp, alts)) = scored.remove(&i) {
                    line["logprob"] = lp.into();
                    if !alts.is_empty() {
                        line["top_logprobs"] =
                            alts.iter().map(|(t, lp)| serde_json::json!({"token": t, "logprob": lp})).collect();
                    }
                }
                if let Some((tokenizer, stops)) = texts.borrow().get(i).cloned().flatten() {
                    let text = so_far
                        .entry(i)
                        .or_insert_with(|| v3c_runtime::session::TextSoFar::new(&tokenizer, stops.as_ref()));
                    line["text"] = text.push(t).into();
                }
                reply(line)?
            }
            Progress::Token(_) => {}
            Progress::Ended(g) => {
                so_far.remove(&i);
                served += 1;
                tokens += g.tokens.len();
                reused += g.reused;
                let mut line = serde_json::json!({
                    "id": id,
                    "tokens": g.tokens,
                    "stopped_at_eos": g.stopped_at_eos,
                    "finish_reason": g.ending.map_or("cancelled", |e| e.name()),
                    "reused_prompt_tokens": g.reused,
                    "queued_s": micro(g.queued_s),
                    "prefill_s": micro(g.prefill_s),
                    "total_s": micro(g.total_s),
                    "decode_tokens_per_s": micro(g.decode_tokens_per_s()),
                });
                if let Some(d) = g.speculation {
                    line["speculation"] = d.json(g.tokens.len().saturating_sub(1));
                    (drafted, later) = (drafted + d, later + g.tokens.len().saturating_sub(1));
                }
                // A chat's reasoning apart from its answer, where the server reads it.
                let (its_tools, reasoning) = tools.borrow().get(i).cloned().unwrap_or_default();
                let (thought, answer) = match reasoning {
                    Some(r) => r.split(&g.tokens),
                    None => (None, g.tokens.clone()),
                };
                if let Some(text) = text_of(&answer) {
                    line["text"] = text.into();
                }
                if let (Some(thought), Some(t)) = (thought, &tokenizer) {
                    line["reasoning_content"] = t.decode(&thought, true).into();
                }
                // Calls of its tools: the content before them, the calls, and why it ended.
                let called =
                    tokenizer.as_ref().and_then(|t| v3c_runtime::openai::called(its_tools.as_deref(), t, i, &answer));
                if let Some(c) = called {
                    line["content"] = c.content.into();
                    line["tool_calls"] = c.tool_calls;
                    if line["finish_reason"] == "eos" || line["finish_reason"] == "stop" {
                        line["finish_reason"] = "tool_calls".into();
                    }
                }
                if !g.logprobs.is_empty() {
                    // NaN (a token the device picked) as null.
                    let lp: Vec<serde_json::Value> = g.logprobs.iter().map(|&x| serde_json::json!(x)).collect();
                    line["logprobs"] = serde_json::Value::Array(lp);
                }
                let top = |alts: &Vec<(u32, f32)>| -> serde_json::Value {
                    alts.iter().map(|(t, lp)| serde_json::json!({"token": t, "logprob": lp})).collect()
                };
                if !g.top_logprobs.is_empty() {
                    line["top_logprobs"] = g.top_logprobs.iter().map(top).collect();
                }
                // "echo": the prompt's tokens after the first, each scored by the one before.
                if !g.prompt_logprobs.is_empty() {
                    line["prompt_logprobs"] = g.prompt_logprobs.iter().map(|&x| serde_json::json!(x)).collect();
                }
                if !g.prompt_top_logprobs.is_empty() {
                    line["prompt_top_logprobs"] = g.prompt_top_logprobs.iter().map(top).collect();
                }
                reply(line)?;
            }
            Progress::Cancelled(g) => {
                so_far.remove(&i);
                cancelled += 1;
                tokens += g.tokens.len();
                let mut line = serde_json::json!({
                    "id": id,
                    "cancelled": true,
                    "tokens": g.tokens,
                    "queued_s": micro(g.queued_s),
                    "prefill_s": micro(g.prefill_s),
                    "total_s": micro(g.total_s),
                });
                if let Some(d) = g.speculation {
                    line["speculation"] = d.json(g.tokens.len().saturating_sub(1));
                    (drafted, later) = (drafted + d, later + g.tokens.len().saturating_sub(1));
                }
                if let Some(text) = text_of(&g.tokens) {
                    line["text"] = text.into();
                }
                reply(line)?;
            }
            Progress::Refused(e) => reply(serde_json::json!({"id": id, "error": e}))?,
        }
        Ok(())
    };
    let v3c_runtime::session::ServeRun { joined, prefill_s, .. } =
        v3c_runtime::session::serve(program, &serving, &mut next, &mut done).map_err(at)?;
    let refused = refused + ids.borrow().len() - served - cancelled;
    let total_s = start.elapsed().as_secs_f64();
    let speculation = match drafts {
        Some(_) => format!(
            ", {} of {} MTP drafts accepted, {:.2} tokens per main-model pass",
            drafted.accepted,
            drafted.drafted,
            drafted.tokens_per_pass(later)
        ),
        None => String::new(),
    };
    eprintln!(
        "served {served} requests ({refused} refused, {cancelled} cancelled), {slots} at most at a time, {joined} \
         joined a running batch: \
         {tokens} tokens in {total_s:.3} s ({:.2} tok/s), {prefill_s:.3} s in prefills, {reused} prompt tokens' \
         cache rows reused{speculation} ({kind})",
        tokens as f64 / total_s.max(1e-9)
    );
    Ok(())
}

/// What a program serves: sequences of up to its decode plan's context (in whole pages where it
/// asks), prompts up to what its prefill plan takes, and its decode plan's sequences.
/// Speculative (`drafts` a pass): sequences the speculative entries hold, one at a time.
fn serving_limits(
    program: &dyn v3c_runtime::session::Program,
    drafts: Option<usize>,
) -> Result<(usize, usize, usize), String> {
    if let Some(k) = drafts {
        let limit = v3c_runtime::speculative::sequence_limit(program, k)?;
        return Ok((limit, limit, 1));
    }
    let (decode, prefill) = (program.entry_plan("decode")?, program.entry_plan("prefill")?);
    let multiple = program.cache_rows_multiple().max(1);
    let max_len = decode.sizes.context / multiple * multiple;
    let chunk = prefill.sizes.rows.max(1);
    Ok((max_len, max_len.min(prefill.sizes.context / chunk * chunk + chunk), decode.sizes.rows))
}

/// `LO..HI` (both included) or `N`.
fn length_range(text: &str, flag: &str) -> Result<(usize, usize), String> {
    let bad = || format!("{flag} '{text}': a length N or a range LO..HI of positive lengths");
    let number = |t: &str| t.trim().parse::<usize>().map_err(|_| bad());
    let (lo, hi) = match text.split_once("..") {
        Some((lo, hi)) => (number(lo)?, number(hi)?),
        None => (number(text)?, number(text)?),
    };
    if lo == 0 || hi < lo {
        return Err(bad());
    }
    Ok((lo, hi))
}

fn bench_serve(args: &BenchServeArgs) -> Result<(), Failure> {
    use v3c_runtime::session::{Arrival, Progress, Request};
    let (lo, hi) = length_range(&args.prompt_tokens, "--prompt-tokens").map_err(Failure::Other)?;
    if args.requests == 0 || args.batch == Some(0) || args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(Failure::Other("--requests, --batch and --rate must be positive".into()));
    }
    v3c_runtime::cli::check_sampling(args.temperature, 1.0).map_err(|e| Failure::Other(format!("--{e}")))?;
    if let Some(k) = args.logprobs.filter(|&k| k > 20) {
        return Err(Failure::Other(format!("--logprobs {k}: at most 20 alternatives (OpenAI's top_logprobs)")));
    }
    args.speculating.check_batch(args.batch)?;
    let a = v3c_runtime::artifact::Artifact::open(&args.artifact).map_err(|e| Failure::Other(e.to_string()))?;
    let gpu = a.manifest.target.name != "cpu";
    if gpu {
        device::probe_device(args.device).map_err(|e| Failure::NoDevice(e.to_string()))?;
    }
    let vocab = a.manifest.model.config.get("vocab_size").and_then(|v| v.as_u64()).unwrap_or(0);
    if vocab == 0 {
        return Err(Failure::Other(format!("{}: the model config has no vocab_size", args.artifact.display())));
    }
    let kind = format!(
        "{} artifact{}",
        a.manifest.target.name,
        if gpu { format!(" on cuda:{}", args.device) } else { String::new() }
    );
    let program = load_bench(a, args.weights.as_deref(), args.random_weights, args.device, &kind, args.pick_on_host)?;
    let program = program.as_ref();
    let at = |e: String| Failure::Other(format!("{}: {e}", args.artifact.display()));
    let drafts = args.speculating.drafts();
    if let Some(k) = drafts {
        v3c_runtime::speculative::check(program, k).map_err(at)?;
    }
    let (max_len, max_prompt, rows) = serving_limits(program, drafts).map_err(at)?;
    if args.prompts.is_none() && (hi > max_prompt || hi + args.new_tokens > max_len) {
        return Err(Failure::Other(format!(
            "--prompt-tokens up to {hi} with --new-tokens {}: the artifact serves prompts of 1..={max_prompt} tokens \
             and sequences of {max_len} tokens (compile with a larger --max-context)",
            args.new_tokens
        )));
    }
    let slots = args.batch.unwrap_or(rows);
    let n = args.requests;
    // Each request's sampler: greedy, or at --temperature seeded with --seed plus its number.
    let sampler =
        |i: usize| v3c_models::reference::Sampler::new(args.temperature, 1.0, args.seed.wrapping_add(i as u64));
    // From a file: its requests in turn (those the artifact serves), arrivals evenly spaced.
    let (mut skipped, mut lo, mut hi) = (0usize, lo, hi);
    let from_file: Option<Vec<Request>> = match &args.prompts {
        None => None,
        Some(path) => {
            let weights = args.weights.clone().unwrap_or_default();
            let needs_text = args.tokenizer.is_some() || weights.join("tokenizer.json").is_file();
            let text = TextArgs { tokenizer: args.tokenizer.clone(), chat_template: None };
            let tokenizer = if needs_text { text_tokenizer(&text, &weights, false)? } else { None };
            let body = std::fs::read_to_string(path).map_err(|e| Failure::Other(format!("{}: {e}", path.display())))?;
            let defaults = v3c_runtime::cli::RequestDefaults {
                max_new: args.new_tokens,
                temperature: 0.0,
                top_p: 1.0,
                seed: args.seed,
                shaping: Default::default(),
                eos: None,
                reasoning: false,
                tool_format: Default::default(),
            };
            let mut served = Vec::new();
            for (k, line) in body.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let (_, r) = v3c_runtime::cli::parse_request(line, &defaults, tokenizer.as_ref())
                    .map_err(|e| Failure::Other(format!("{}:{}: {e}", path.display(), k + 1)))?;
                match r.prompt.len() <= max_prompt && r.prompt.len() + r.max_new <= max_len {
                    true => served.push(r),
                    false => skipped += 1,
                }
            }
            if served.is_empty() {
                return Err(Failure::Other(format!(
                    "{}: no request the artifact serves (prompts of 1..={max_prompt} tokens, sequences of {max_len}; {skipped} longer)",
                    path.display()
                )));
            }
            (lo, hi) = (
                served.iter().map(|r| r.prompt.len()).min().unwrap_or(1),
                served.iter().map(|r| r.prompt.len()).max().unwrap_or(1),
            );
            Some(served)
        }
    };
    // The load: prompt lengths and tokens from the seed (splitmix64), arrivals evenly spaced.
    let mut random = splitmix64(args.seed);
    let shared: Vec<u32> = match from_file {
        Some(_) => Vec::new(),
        None => (0..args.shared_prefix.min(hi)).map(|_| (random() % vocab) as u32).collect(),
    };
    let load: Vec<(f64, Request)> = (0..n)
        .map(|i| {
            let arrival = args.rate.map_or(0.0, |r| i as f64 / r);
            if let Some(requests) = &from_file {
                return (arrival, requests[i % requests.len()].clone());
            }
            let len = lo + (random() % (hi - lo + 1) as u64) as usize;
            let own = len.saturating_sub(shared.len());
            let prompt = shared.iter().take(len).copied().chain((0..own).map(|_| (random() % vocab) as u32)).collect();
            let request = Request::new(prompt, args.new_tokens, sampler(i));
            let top_logprobs = args.logprobs.unwrap_or(0);
            (arrival, Request { logprobs: args.logprobs.is_some(), top_logprobs, ..request })
        })
        .collect();
    let (mut first, mut end, mut tokens) = (vec![None; n], vec![None; n], vec![0usize; n]);
    let mut reused = vec![0usize; n];
    // Speculative: the drafts of every request together.
    let mut drafted = v3c_runtime::session::Speculated::default();
    let bar = indicatif::ProgressBar::new(n as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("serving [{bar:30}] {pos}/{len} requests") {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut arrived = 0;
    let start = std::time::Instant::now();
    let mut next = |idle: bool| {
        let Some((due, request)) = load.get(arrived) else { return Arrival::Closed };
        let wait = due - start.elapsed().as_secs_f64();
        if wait > 0.0 && !idle {
            return Arrival::NotYet;
        }
        std::thread::sleep(std::time::Duration::from_secs_f64(wait.max(0.0)));
        arrived += 1;
        Arrival::Request(request.clone())
    };
    let mut report = |i: usize, p: Progress| -> Result<(), String> {
        let now = start.elapsed().as_secs_f64();
        match p {
            Progress::Scored(..) => {}
            Progress::Token(_) => {
                first[i] = first[i].or(Some(now));
            }
            Progress::Ended(g) => {
                (end[i], tokens[i], reused[i]) = (Some(now), g.tokens.len(), g.reused);
                drafted = drafted + g.speculation.unwrap_or_default();
                bar.inc(1);
            }
            Progress::Refused(e) => return Err(format!("request {i}: {e}")),
            Progress::Cancelled(_) => return Err(format!("request {i} cancelled")),
        }
        Ok(())
    };
    let longest = load.iter().map(|(_, r)| r.prompt.len() + r.max_new).max().unwrap_or(hi + args.new_tokens);
    let limits = vec![longest; slots];
    // What joining prompts may prefill between two decode steps (whole chunks, at least one).
    let chunk = program.entry_plan("prefill").map_err(at)?.sizes.rows.max(1);
    let budget = args.scheduling.prefill_budget.unwrap_or(chunk).max(chunk) / chunk * chunk;
    let serving = v3c_runtime::session::Serving {
        prefill_budget: args.scheduling.prefill_budget,
        reuse_prefixes: !args.scheduling.no_prefix_reuse,
        speculative: drafts,
        every_slot: args.every_slot,
        ..v3c_runtime::session::Serving::new(slots, &limits, hi, None)
    };
    let run = v3c_runtime::session::serve(program, &serving, &mut next, &mut report).map_err(at)?;
    let (joined, prefill_s) = (run.joined, run.prefill_s);
    let total_s = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let (first, end): (Vec<f64>, Vec<f64>) =
        (first.into_iter().flatten().collect(), end.into_iter().flatten().collect());
    if first.len() != n || end.len() != n {
        return Err(Failure::Other("a request was never served".into()));
    }
    let ttft: Vec<f64> = (0..n).map(|i| first[i] - load[i].0).collect();
    let latency: Vec<f64> = (0..n).map(|i| end[i] - load[i].0).collect();
    let tpot: Vec<f64> =
        (0..n).filter(|&i| tokens[i] > 1).map(|i| (end[i] - first[i]) / (tokens[i] - 1) as f64).collect();
    let stats = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let at = |p: f64| s.get(((p * s.len() as f64).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0);
        let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
        serde_json::json!({"mean": mean, "p50": at(0.5), "p99": at(0.99)})
    };
    let generated: usize = tokens.iter().sum();
    let (ttft, tpot, latency) = (stats(&ttft), stats(&tpot), stats(&latency));
    let arrivals = args.rate.map_or("all at once".to_string(), |r| format!("{r} a second"));
    let new_each = match &args.prompts {
        None => format!("{} new each", args.new_tokens),
        Some(p) => format!("from {}, {skipped} of its requests too long for the artifact skipped", p.display()),
    };
    println!(
        "served {n} requests (prompts of {lo}..{hi} tokens, {new_each}, {slots} at a time, arriving {arrivals}; \
         {joined} joined a running batch): {generated} tokens in {total_s:.3} s — {:.1} tokens/s, {:.2} requests/s ({kind})",
        generated as f64 / total_s.max(1e-9),
        n as f64 / total_s.max(1e-9)
    );
    let ms = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0) * 1e3;
    for (name, v) in [("time to first token", &ttft), ("time per output token", &tpot), ("latency", &latency)] {
        println!(
            "  {name:22} mean {:10.3} ms   p50 {:10.3} ms   p99 {:10.3} ms",
            ms(v, "mean"),
            ms(v, "p50"),
            ms(v, "p99")
        );
    }
    let prompt_total: usize = load.iter().map(|l| l.1.prompt.len()).sum();
    let reused_total: usize = reused.iter().sum();
    println!(
        "  prefills              {prefill_s:.3} s of the run; {reused_total} of {prompt_total} prompt tokens' cache rows \
         reused"
    );
    if run.decode_steps > 0 {
        println!(
            "  decode rows           {} run in {} steps ({:.1}% of {slots} a step), {} of them decoding ({:.1}% of those run)",
            run.rows_run,
            run.decode_steps,
            100.0 * run.rows_run as f64 / (run.decode_steps * slots) as f64,
            run.rows_fed,
            100.0 * run.rows_fed as f64 / run.rows_run.max(1) as f64
        );
    }
    let speculated = drafts.map(|_| drafted.json(generated.saturating_sub(n)));
    if let Some(d) = &speculated {
        println!(
            "  MTP drafts            {} of {} accepted ({:.1}%), {:.2} tokens per main-model pass",
            drafted.accepted,
            drafted.drafted,
            100.0 * drafted.acceptance(),
            d["tokens_per_pass"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(out) = &args.out {
        let per: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                serde_json::json!({"arrival_s": load[i].0, "prompt_tokens": load[i].1.prompt.len(), "tokens": tokens[i],
                                        "first_token_s": first[i], "end_s": end[i], "reused_prompt_tokens": reused[i]})
            })
            .collect();
        let json = serde_json::json!({
            "artifact": args.artifact.display().to_string(), "target": kind,
            "weights": if args.random_weights.is_some() { "random" } else { "checkpoint" },
            "requests": n, "batch": slots, "prompt_tokens": [lo, hi], "new_tokens": args.new_tokens, "rate": args.rate,
            "prefill_budget_tokens": budget, "shared_prefix_tokens": shared.len(),
            "prompts_file": args.prompts.as_ref().map(|p| p.display().to_string()), "skipped_requests": skipped,
            "prefix_reuse": !args.scheduling.no_prefix_reuse, "reused_prompt_tokens": reused_total, "joined": joined, "total_s": total_s, "prefill_s": prefill_s, "generated_tokens": generated,
            "decode_steps": run.decode_steps, "decode_rows_run": run.rows_run, "decode_rows_fed": run.rows_fed, "every_slot": args.every_slot,
            "temperature": args.temperature, "logprobs": args.logprobs, "pick_on_host": args.pick_on_host,
            "tokens_per_s": generated as f64 / total_s.max(1e-9),
            "time_to_first_token_s": ttft, "time_per_output_token_s": tpot, "latency_s": latency,
            "speculation": speculated, "per_request": per,
        });
        let text = serde_json::to_string_pretty(&json).map_err(|e| Failure::Other(e.to_string()))? + "\n";
        std::fs::write(out, text).map_err(|e| Failure::Other(format!("{}: {e}", out.display())))?;
    }
    Ok(())
}

/// The tokenizer text goes through: `--tokenizer`, else the checkpoint's tokenizer.json when it
/// has one. `needed` (text was given): having none is an error naming both places; otherwise a
/// checkpoint's tokenizer that does not load is only a warning (token ids still work).
fn text_tokenizer(
    args: &TextArgs,
    weights: &std::path::Path,
    needed: bool,
) -> Result<Option<std::sync::Arc<v3c_runtime::tokenizer::Tokenizer>>, Failure> {
    use v3c_runtime::tokenizer::Tokenizer;
    let needed = needed || args.chat_template.is_some();
    let beside = weights.join("tokenizer.json");
    let loaded = match &args.tokenizer {
        Some(path) => Tokenizer::from_path(path).map_err(Failure::Other)?,
        None if !beside.is_file() => {
            return match needed {
                true => Err(Failure::Other(format!(
                    "text needs a tokenizer: {} does not exist (give --tokenizer FILE)",
                    beside.display()
                ))),
                false => Ok(None),
            }
        }
        None => match Tokenizer::from_file(&beside) {
            Ok(t) => t,
            Err(e) if needed => return Err(Failure::Other(e)),
            Err(e) => {
                eprintln!("v3r: warning: {e} (token ids only)");
                return Ok(None);
            }
        },
    };
    let mut tokenizer = loaded;
    if let Some(file) = &args.chat_template {
        let source = std::fs::read_to_string(file).map_err(|e| Failure::Other(format!("{}: {e}", file.display())))?;
        tokenizer.set_chat_template(&source).map_err(|e| Failure::Other(format!("{}: {e}", file.display())))?;
    }
    Ok(Some(std::sync::Arc::new(tokenizer)))
}

fn tokenize(args: &TokenizeArgs) -> Result<(), String> {
    let mut tokenizer = v3c_runtime::tokenizer::Tokenizer::from_path(&args.tokenizer)?;
    if let Some(file) = &args.chat {
        if let Some(template) = &args.chat_template {
            let source = std::fs::read_to_string(template).map_err(|e| format!("{}: {e}", template.display()))?;
            tokenizer.set_chat_template(&source).map_err(|e| format!("{}: {e}", template.display()))?;
        }
        let name = file.display().to_string();
        let text = match name.as_str() {
            "-" => std::io::read_to_string(std::io::stdin()).map_err(|e| format!("stdin: {e}"))?,
            _ => std::fs::read_to_string(file).map_err(|e| format!("{name}: {e}"))?,
        };
        let conversation: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{name}: {e}"))?;
        const FIELDS: [&str; 5] =
            ["messages", "tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message"];
        if let Some(k) = conversation.as_object().and_then(|o| o.keys().find(|k| !FIELDS.contains(&k.as_str()))) {
            return Err(format!("{name}: unknown field '{k}' ({})", FIELDS.join(", ")));
        }
        let rendered = tokenizer.render_conversation(&conversation).map_err(|e| format!("{name}: {e}"))?;
        if args.render {
            print!("{rendered}");
        } else {
            let ids: Vec<String> = tokenizer.encode(&rendered, false).iter().map(u32::to_string).collect();
            println!("{}", ids.join(" "));
        }
        return Ok(());
    }
    let special = !args.no_special_tokens;
    let mut texts = args.text.clone();
    if texts.is_empty() {
        let mut all = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut all).map_err(|e| format!("stdin: {e}"))?;
        texts.push(all);
    }
    for (i, text) in texts.iter().enumerate() {
        if args.decode {
            let ids = v3c_runtime::cli::parse_token_ids(text, &format!("argument {}", i + 1))?;
            if let Some(&bad) = ids.iter().find(|&&id| tokenizer.token(id).is_none()) {
                return Err(format!("argument {}: {bad} is not a token of {}", i + 1, args.tokenizer.display()));
            }
            println!("{}", tokenizer.decode(&ids, !special));
        } else {
            let ids: Vec<String> = tokenizer.encode(text, special).iter().map(u32::to_string).collect();
            println!("{}", ids.join(" "));
        }
    }
    Ok(())
}

fn run(args: &RunArgs) -> Result<(), Failure> {
    args.generating.check()?;
    let a = open_to_generate(&args.artifact, &args.weights, args.device)?;
    args.generating.check_vocabulary(&a)?;
    let mut prompts: Vec<Vec<u32>> = args
        .prompt_tokens
        .iter()
        .map(|p| v3c_runtime::cli::parse_token_ids(p, "--prompt-tokens"))
        .collect::<Result<_, _>>()
        .map_err(Failure::Other)?;
    let text_in = !args.prompt.is_empty() || !args.chat.is_empty();
    let tokenizer = text_tokenizer(&args.text, &args.weights, text_in || args.generating.shaping.guided())?;
    for (i, text) in args.prompt.iter().enumerate() {
        let ids = tokenizer.as_ref().expect("text needs one").encode(text, true);
        if ids.is_empty() {
            return Err(Failure::Other(format!("--prompt {}: no tokens (an empty text)", i + 1)));
        }
        prompts.push(ids);
    }
    for (i, message) in args.chat.iter().enumerate() {
        let conversation = serde_json::json!([{ "role": "user", "content": message }]);
        let ids = tokenizer.as_ref().expect("text needs one").chat(&conversation, true);
        prompts.push(ids.map_err(|e| Failure::Other(format!("--chat {}: {e}", i + 1)))?);
    }
    // Text in, text out.
    let (guide_tokenizer, tokenizer) = (tokenizer.clone(), tokenizer.filter(|_| text_in));
    if let Some(file) = &args.prompts_file {
        prompts.extend(v3c_runtime::cli::read_prompts(file).map_err(Failure::Other)?);
    }
    // A token past the vocabulary, named by where its prompt came from, before anything loads.
    let vocab = vocabulary(&a);
    let past = prompts.iter().enumerate().find_map(|(i, p)| p.iter().find(|&&t| t as u64 >= vocab).map(|&t| (i, t)));
    if let Some((i, t)) = past {
        let (tokens, texts, chats) = (args.prompt_tokens.len(), args.prompt.len(), args.chat.len());
        let which = match i {
            _ if i < tokens && tokens == 1 => "--prompt-tokens".to_string(),
            _ if i < tokens => format!("--prompt-tokens {}", i + 1),
            _ if i < tokens + texts => format!("--prompt {} (through the tokenizer)", i - tokens + 1),
            _ if i < tokens + texts + chats => format!("--chat {} (through the tokenizer)", i - tokens - texts + 1),
            _ => format!(
                "{}: prompt {}",
                args.prompts_file.as_deref().map_or("--prompts-file".into(), |f| f.display().to_string()),
                i - tokens - texts - chats + 1
            ),
        };
        return Err(Failure::Other(format!("{which}: token id {t} is outside the model's vocabulary (0..{vocab})")));
    }
    let several = prompts.len() > 1;
    let print = |tokens: &[u32]| match &tokenizer {
        Some(t) if several => println!("{}", serde_json::Value::from(t.decode(tokens, true))),
        Some(t) => println!("{}", t.decode(tokens, true)),
        None => println!("{}", tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")),
    };
    if args.batch == Some(0) {
        return Err(Failure::Other("--batch 0: at least one sequence decodes at a time".into()));
    }
    let prompt = prompts.first().cloned().ok_or_else(|| Failure::Other("no prompt given".into()))?;
    a.check_weights(&args.weights).map_err(Failure::Other)?;
    let eos = eos_of(&a, args.generating.ignore_eos);
    let guide = args.generating.shaping.constraint(guide_tokenizer.as_ref(), eos).map_err(Failure::Other)?;
    // Each sequence's sampler: the flags', held to the constraint asked for.
    let sampler = |seed: u64| {
        let s = args.generating.sampler(seed);
        guide.as_ref().map_or(s.clone(), |c| s.constrained(c.clone()))
    };
    let (program, kind) = load_program(a, &args.weights, args.device, args.generating.pick_on_host)?;
    let program = program.as_ref();
    if args.speculating.speculative {
        args.speculating.check_batch(args.batch)?;
        // Speculative decoding runs one sequence at a time: the prompts in turn.
        for prompt in &prompts {
            let mut sampler = sampler(args.generating.seed);
            let g = v3c_runtime::speculative::generate_speculative(
                program,
                prompt,
                args.generating.max_new_tokens,
                args.speculating.draft_tokens,
                &mut sampler,
                eos,
            )
            .map_err(|e| Failure::Other(format!("{}: {e}", args.artifact.display())))?;
            print(&g.tokens);
            let s = g.speculation.unwrap_or_default();
            eprintln!(
                "{} ({kind}, speculative: {} of {} MTP drafts accepted, {:.2} tokens per main-model pass)",
                g.summary(prompt.len()),
                s.accepted,
                s.drafted,
                s.tokens_per_pass(g.tokens.len().saturating_sub(1))
            );
        }
        return Ok(());
    }
    if prompts.len() > 1 || args.batch.is_some() {
        let mut samplers: Vec<_> = (0..prompts.len()).map(|_| sampler(args.generating.seed)).collect();
        let rows = program.entry_plan("decode").map_err(Failure::Other)?.sizes.rows;
        let slots = args.batch.unwrap_or(rows.min(prompts.len()));
        let served = v3c_runtime::session::generate_queue(
            program,
            &prompts,
            v3c_runtime::session::Queue {
                slots,
                prefill_budget: args.scheduling.prefill_budget,
                reuse_prefixes: !args.scheduling.no_prefix_reuse,
            },
            args.generating.max_new_tokens,
            &mut samplers,
            eos,
        )
        .map_err(|e| Failure::Other(format!("{}: {e}", args.artifact.display())))?;
        let generations = &served.generations;
        for g in generations {
            print(&g.tokens);
        }
        let new: usize = generations.iter().map(|g| g.tokens.len()).sum();
        let decoded = new.saturating_sub(generations.len());
        // A pool of cache pages: what each sequence held of it at its end.
        let pool = generations.iter().map(|g| g.pages).collect::<Option<Vec<_>>>().map_or(String::new(), |p| {
            let held: Vec<String> = p.iter().map(|(h, _)| h.to_string()).collect();
            format!("; cache pages {} of a pool of {}", held.join(" + "), p.first().map_or(0, |(_, n)| *n))
        });
        let queue = match (served.slots < generations.len(), served.joined) {
            (false, _) => String::new(),
            (true, 0) => format!(", {} at a time in batches one after another", served.slots),
            (true, j) => format!(", {} at a time: {j} joined the running batch as others ended", served.slots),
        };
        eprintln!(
            "generated {new} tokens for {} sequences{queue}: prefill {} tokens in {:.3} s, decode {:.2} tok/s \
             over the batch{pool} ({kind})",
            generations.len(),
            prompts.iter().map(Vec::len).sum::<usize>(),
            served.prefill_s,
            decoded as f64 / (served.total_s - served.prefill_s).max(1e-9)
        );
        return Ok(());
    }
    let mut session =
        v3c_runtime::session::ArtifactSession::new(program, prompt.len() + args.generating.max_new_tokens)
            .map_err(|e| Failure::Other(format!("{}: {e}", args.artifact.display())))?;
    let mut sampler = sampler(args.generating.seed);
    // Text for one prompt: written as it comes.
    let mut so_far = tokenizer.as_ref().map(|t| v3c_runtime::session::TextSoFar::new(t, None));
    let show = |piece: String| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(piece.as_bytes()).and_then(|_| out.flush());
    };
    let mut picked = |t: u32| {
        if let Some(text) = so_far.as_mut() {
            show(text.push(t));
        }
    };
    let generation = v3c_runtime::session::generate_each(
        &mut session,
        &prompt,
        args.generating.max_new_tokens,
        &mut sampler,
        eos,
        &mut picked,
    )
    .map_err(Failure::Other)?;
    match so_far {
        Some(text) => show(text.finish() + "\n"),
        None => print(&generation.tokens),
    }
    eprintln!("{} ({kind})", generation.summary(prompt.len()));
    Ok(())
}

/// Loads an artifact to run it: a cpu one here, a GPU one on device `ordinal` (exit 3 without a
/// GPU). Returns it and how reports name it.
fn load_program(
    a: v3c_runtime::artifact::Artifact,
    weights: &std::path::Path,
    ordinal: usize,
    pick_on_host: bool,
) -> Result<(Box<dyn v3c_runtime::session::Program>, String), Failure> {
    let target = a.manifest.target.name.clone();
    if target == "cpu" {
        let program = v3c_runtime::cpu::CpuArtifact::load(a, weights).map_err(Failure::Other)?;
        return Ok((Box::new(program), "cpu artifact".into()));
    }
    device::probe_device(ordinal).map_err(|e| Failure::NoDevice(e.to_string()))?;
    let start = std::time::Instant::now();
    let (bar, mut tick) = load_progress(&a);
    let gpu = v3c_runtime::cuda::GpuArtifact::load(a, weights, ordinal, &mut tick).map_err(Failure::Other)?;
    gpu.pick_on_host(pick_on_host);
    bar.finish_and_clear();
    eprintln!(
        "loaded on cuda:{ordinal} in {:.2} s ({} kernels and weights)",
        start.elapsed().as_secs_f64(),
        bar.position()
    );
    Ok((Box::new(gpu), format!("{target} artifact on cuda:{ordinal}")))
}

fn logits(args: &LogitsArgs) -> Result<(), Failure> {
    let a = v3c_runtime::artifact::Artifact::open(&args.artifact).map_err(|e| Failure::Other(e.to_string()))?;
    // A GPU artifact needs the GPU before anything reads a checkpoint.
    if a.manifest.target.name != "cpu" {
        device::probe_device(args.device).map_err(|e| Failure::NoDevice(e.to_string()))?;
    }
    let tokens = v3c_runtime::cli::parse_token_ids(&args.tokens, "--tokens").map_err(Failure::Other)?;
    let vocab = vocabulary(&a);
    if let Some(t) = tokens.iter().find(|&&t| t as u64 >= vocab) {
        return Err(Failure::Other(format!("--tokens: token id {t} is outside the model's vocabulary (0..{vocab})")));
    }
    a.check_weights(&args.weights).map_err(Failure::Other)?;
    let (program, kind) = load_program(a, &args.weights, args.device, false)?;
    let mut session = v3c_runtime::session::ArtifactSession::new(program.as_ref(), tokens.len())
        .map_err(|e| Failure::Other(format!("{}: {e}", args.artifact.display())))?;
    let (rows, vocab) = session.prefill_rows(&tokens).map_err(Failure::Other)?;
    let tensor = v3c_models::tensor::Tensor::f32(vec![tokens.len(), vocab], rows);
    v3c_models::checkpoint::save_tensors(&args.out, &[("logits", &tensor)])
        .map_err(|e| Failure::Other(e.to_string()))?;
    eprintln!("wrote logits [{}, {vocab}] to {} ({kind})", tokens.len(), args.out.display());
    Ok(())
}

fn chat(args: &ChatArgs) -> Result<(), Failure> {
    use std::io::{BufRead, IsTerminal, Write};
    use v3c_runtime::reasoning::Reasoning;
    use v3c_runtime::route::{RouteEnd, Routed, Router};
    use v3c_runtime::session::{Arrival, Progress, Request};
    args.generating.check()?;
    let a = open_to_generate(&args.artifact, &args.weights, args.device)?;
    args.generating.check_vocabulary(&a)?;
    a.check_weights(&args.weights).map_err(Failure::Other)?;
    let tokenizer = text_tokenizer(&args.text, &args.weights, true)?.expect("needed");
    if !tokenizer.has_chat_template() {
        return Err(Failure::Other(
            "no chat template: the tokenizer's tokenizer_config.json has no chat_template".into(),
        ));
    }
    if args.reasoning_parser.is_some() {
        Reasoning::new(&tokenizer, &[]).map_err(|e| Failure::Other(format!("--reasoning-parser: {e}")))?;
    }
    let eos = eos_of(&a, args.generating.ignore_eos);
    let guide = args.generating.shaping.constraint(Some(&tokenizer), eos).map_err(Failure::Other)?;
    let tools = match &args.tools {
        None => None,
        Some(path) => {
            let at = |e: String| Failure::Other(format!("{}: {e}", path.display()));
            let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
            let given: serde_json::Value = serde_json::from_str(&text).map_err(|e| at(format!("not JSON: {e}")))?;
            let choice = match args.tool_choice.as_str() {
                c @ ("auto" | "none" | "required") => serde_json::Value::from(c),
                name => serde_json::json!({"type": "function", "function": {"name": name}}),
            };
            let tools = v3c_runtime::tools::Tools::parse(Some(&given), Some(&choice), None, &tokenizer)
                .map_err(|e| Failure::Other(format!("--tools {}: {e}", path.display())))?
                .map(|t| t.written_as(args.tool_call_parser.format()));
            tools.map(std::sync::Arc::new)
        }
    };
    let calling = tools.as_ref().filter(|t| t.calling());
    if let Some(t) = calling {
        if guide.is_some() {
            return Err(Failure::Other("--tools and a guided flag: one of them (or --tool-choice none)".into()));
        }
        let Some(eos) = eos else {
            return Err(Failure::Other("--tools: needs the end token to end the calls (not --ignore-eos)".into()));
        };
        // Checked once: every turn's constraint is made alike.
        t.constraint(&tokenizer, eos).map_err(Failure::Other)?;
    }
    let (program, kind) = load_program(a, &args.weights, args.device, args.generating.pick_on_host)?;
    let at = |e: String| Failure::Other(format!("{}: {e}", args.artifact.display()));
    if let (Some(t), Some(vocab)) = (calling, v3c_runtime::session::vocabulary(program.as_ref())) {
        if t.trigger as usize >= vocab {
            return Err(at(format!(
                "--tools: the calls' opening marker (token id {}) is outside the model's vocabulary (0..{vocab})",
                t.trigger
            )));
        }
    }
    let drafts = args.speculating.drafts();
    let kind = args.speculating.said(program.as_ref(), kind).map_err(at)?;
    let (max_len, max_prompt, _) = serving_limits(program.as_ref(), drafts).map_err(at)?;
    let limits = [max_len];
    let serving = v3c_runtime::session::Serving {
        reuse_prefixes: !args.no_prefix_reuse,
        speculative: drafts,
        ..v3c_runtime::session::Serving::new(1, &limits, max_prompt, eos)
    };
    let messages = std::cell::RefCell::new(match &args.system {
        Some(s) => vec![serde_json::json!({ "role": "system", "content": s })],
        None => Vec::new(),
    });
    let (terminal, mut turn) = (std::io::stdin().is_terminal(), 0u64);
    let mut lines = std::io::stdin().lock().lines();
    eprintln!("chatting with {} ({kind}); an empty line ends", args.artifact.display());
    // The calls the last reply made, each waiting for its output: (id, name).
    let waiting = std::cell::RefCell::new(std::collections::VecDeque::<(String, String)>::new());
    // The reply's tokens routed: reasoning (with --reasoning-parser), answer and calls.
    let router = std::cell::RefCell::new(None::<Router>);
    let given = tools.as_ref().map(|t| &t.given);
    let mut next = |idle: bool| {
        if !idle {
            return Arrival::NotYet;
        }
        let call = waiting.borrow_mut().pop_front();
        if terminal {
            match &call {
                Some((id, name)) => eprint!("{name} ({id}) output> "),
                None => eprint!("> "),
            }
        }
        let Some(Ok(line)) = lines.next() else { return Arrival::Closed };
        if line.trim().is_empty() {
            return Arrival::Closed;
        }
        let message = match call {
            Some((id, _)) => serde_json::json!({ "role": "tool", "tool_call_id": id, "content": line }),
            None => serde_json::json!({ "role": "user", "content": line }),
        };
        messages.borrow_mut().push(message);
        if !waiting.borrow().is_empty() {
            // More calls' outputs to read before the model goes on.
            return Arrival::NotYet;
        }
        let ids = match tokenizer.chat_with(
            &serde_json::Value::from(messages.borrow().clone()),
            v3c_runtime::tokenizer::ChatContext::tools(given),
            true,
        ) {
            Ok(ids) => ids,
            Err(e) => {
                eprintln!("v3r: error: {e}");
                return Arrival::Closed;
            }
        };
        let new = args.generating.max_new_tokens;
        if ids.len() > max_prompt || ids.len() + new > max_len {
            eprintln!(
                "v3r: the conversation is {} tokens: with {new} new ones it no longer fits the artifact's {max_len} \
                 (prompts of at most {max_prompt}); start again",
                ids.len()
            );
            return Arrival::Closed;
        }
        turn += 1;
        let reasoning = args.reasoning_parser.and_then(|_| Reasoning::new(&tokenizer, &ids).ok());
        *router.borrow_mut() = Some(Router::new(Some(&tokenizer), None, reasoning, calling.map(|t| t.as_ref())));
        let g = &args.generating;
        let s = g.sampler(g.seed + turn);
        let constraint = match (&tools, eos) {
            (Some(t), Some(eos)) if guide.is_none() => t.constraint(&tokenizer, eos).ok(),
            _ => guide.clone(),
        };
        Arrival::Request(Request::new(ids, new, constraint.map_or(s.clone(), |c| s.constrained(c))))
    };
    let dim = std::io::stderr().is_terminal();
    // Reasoning printed and not yet ended with a line's end.
    let mut thinking = false;
    let mut think = |text: &str, end: bool| {
        if text.is_empty() && !(end && thinking) {
            return;
        }
        let text = if end { format!("{text}\n") } else { text.to_string() };
        match dim {
            true => eprint!("\x1b[2m{text}\x1b[0m"),
            false => eprint!("{text}"),
        }
        thinking = !end;
    };
    let mut report = |i: usize, p: Progress| -> Result<(), String> {
        let mut out = std::io::stdout().lock();
        let write = |out: &mut std::io::StdoutLock, s: &str| out.write_all(s.as_bytes()).and_then(|_| out.flush());
        match p {
            Progress::Scored(..) => {}
            Progress::Token(t) => {
                let Some(r) = router.borrow_mut().as_mut().map(|r| r.token(t, None)) else { return Ok(()) };
                for routed in r {
                    match routed {
                        Routed::Think { text, .. } => think(&text, false),
                        // At the reasoning's end, its last text and a line's end.
                        Routed::ThinkEnd(rest) => think(&rest, true),
                        Routed::Say { text, .. } => write(&mut out, &text).map_err(|e| format!("stdout: {e}"))?,
                        // Calls are printed whole at the end.
                        Routed::Call(_) => {}
                    }
                }
            }
            Progress::Ended(g) | Progress::Cancelled(g) => {
                let Some(r) = router.borrow_mut().take() else { return Ok(()) };
                let RouteEnd { answer, called, thought, rest, .. } = r.end(i, calling.map(|t| t.as_ref()), &g.tokens);
                // Reasoning that never closed: its last text and a line's end.
                think(&thought, true);
                write(&mut out, &format!("{rest}\n")).map_err(|e| format!("stdout: {e}"))?;
                let Some(called) = called else {
                    let reply = v3c_runtime::session::generation_text(&tokenizer, &answer, None);
                    messages.borrow_mut().push(serde_json::json!({ "role": "assistant", "content": reply }));
                    return Ok(());
                };
                for call in called.tool_calls.as_array().into_iter().flatten() {
                    let (id, f) = (call["id"].as_str().unwrap_or(""), &call["function"]);
                    let (name, arguments) = (f["name"].as_str().unwrap_or(""), f["arguments"].as_str().unwrap_or(""));
                    write(&mut out, &format!("tool call {id}: {name} {arguments}\n"))
                        .map_err(|e| format!("stdout: {e}"))?;
                    waiting.borrow_mut().push_back((id.to_string(), name.to_string()));
                }
                let content = if called.content.is_empty() { serde_json::Value::Null } else { called.content.into() };
                let message =
                    serde_json::json!({ "role": "assistant", "content": content, "tool_calls": called.tool_calls });
                messages.borrow_mut().push(message);
                let seconds = g.total_s.max(1e-9);
                tracing::info!("{} tokens in {seconds:.2} s, {} prompt tokens' rows shared", g.tokens.len(), g.reused);
            }
            Progress::Refused(e) => eprintln!("v3r: error: {e}"),
        }
        Ok(())
    };
    v3c_runtime::session::serve(program.as_ref(), &serving, &mut next, &mut report).map_err(at)?;
    Ok(())
}

fn perplexity(args: &PerplexityArgs) -> Result<(), Failure> {
    let a = v3c_runtime::artifact::Artifact::open(&args.artifact).map_err(|e| Failure::Other(e.to_string()))?;
    if a.manifest.target.name != "cpu" {
        device::probe_device(args.device).map_err(|e| Failure::NoDevice(e.to_string()))?;
    }
    let vocab = a.manifest.model.config.get("vocab_size").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let mut tokens: Vec<u32> = match &args.tokenizer {
        Some(path) => {
            let t = v3c_runtime::tokenizer::Tokenizer::from_path(path).map_err(Failure::Other)?;
            v3c_runtime::training::read_text_file(&args.data, &t, vocab)
        }
        None => v3c_runtime::training::read_token_file(&args.data, vocab),
    }
    .map_err(Failure::Other)?
    .into_iter()
    .map(|t| t as u32)
    .collect();
    tokens.truncate(args.max_tokens.unwrap_or(usize::MAX));
    a.check_weights(&args.weights).map_err(Failure::Other)?;
    let (program, kind) = load_program(a, &args.weights, args.device, args.score_on_host)?;
    let at = |e: String| Failure::Other(format!("{}: {e}", args.artifact.display()));
    let scored_on = if program.device_scores() { "scored on the device" } else { "scored on the host" };
    let (_, max_prompt, _) = serving_limits(program.as_ref(), None).map_err(at)?;
    let window = args.window.unwrap_or(max_prompt.min(tokens.len().max(2)));
    if window > max_prompt {
        return Err(Failure::Other(format!(
            "--window {window}: the artifact's prefill takes at most {max_prompt} tokens"
        )));
    }
    let stride = args.stride.unwrap_or(window);
    let windows = v3c_runtime::perplexity::windows(tokens.len(), window, stride).map_err(Failure::Other)?.len();
    let bar = indicatif::ProgressBar::new(windows as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("scoring [{bar:30}] {pos}/{len} windows {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let p = v3c_runtime::perplexity::perplexity(program.as_ref(), &tokens, window, stride, &mut |done, _| {
        bar.set_position(done as u64)
    })
    .map_err(at)?;
    bar.finish_and_clear();
    let tokens_per_s = p.tokens as f64 / p.seconds.max(1e-9);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "perplexity": p.perplexity(), "mean_nll": p.mean_nll(), "tokens_scored": p.tokens,
                "windows": p.windows, "window": window, "stride": stride, "seconds": p.seconds,
                "tokens_per_s": tokens_per_s, "artifact": kind, "scored_on_device": program.device_scores(),
            })
        );
    } else {
        println!(
            "perplexity {:.4} (mean NLL {:.5} nats over {} tokens, {} windows of {window} every {stride}; {:.1} tok/s, {kind}, {scored_on})",
            p.perplexity(),
            p.mean_nll(),
            p.tokens,
            p.windows,
            tokens_per_s
        );
    }
    Ok(())
}

fn bench_decode(args: &BenchDecodeArgs) -> Result<(), Failure> {
    use v3c_runtime::host::{HostBuffer, HostData};
    let (a, plan, kind) = open_bench(&args.artifact, "decode", args.device)?;
    let (rows, plan_context) = (plan.sizes.rows, plan.sizes.context);
    if let Some(&b) = args.batch.iter().find(|&&b| b == 0 || b > rows) {
        return Err(Failure::Other(format!("--batch {b}: the decode plan holds 1..={rows} sequences")));
    }
    if let Some(&c) = args.context.iter().find(|&&c| c == 0 || c > plan_context) {
        return Err(Failure::Other(format!("--context {c}: the decode plan holds 1..={plan_context} rows")));
    }
    let bounds = plan.bounds;
    let program = load_bench(a, args.weights.as_deref(), args.random_weights, args.device, &kind, false)?;
    let mut report = Vec::new();
    let points: Vec<(usize, usize)> =
        args.context.iter().flat_map(|&c| args.batch.iter().map(move |&b| (b, c))).collect();
    // Caches in whole pages where the artifact's decode attention reads them as pages (the last
    // position stays `context - 1`).
    let multiple = program.cache_rows_multiple().max(1);
    for (b, context) in points {
        let cache_rows = context.next_multiple_of(multiple);
        if cache_rows > plan_context {
            return Err(Failure::Other(format!(
                "--context {context}: caches of {cache_rows} rows in whole pages, the decode plan holds {plan_context}"
            )));
        }
        let mut inputs = std::collections::HashMap::new();
        // A pool of pages: the sequences' pages interleaved, as sequences growing together take them.
        let pages = cache_rows / v3c_runtime::pages::PAGE_ROWS;
        let mut pool = v3c_runtime::pages::PagePool::new(b * pages, b);
        for page in 0..pages {
            for s in 0..b {
                pool.reserve(s, (page + 1) * v3c_runtime::pages::PAGE_ROWS).map_err(Failure::Other)?;
            }
        }
        for (name, shape) in &bounds {
            let buffer = match name.as_str() {
                "tokens" | "mtp_tokens" => HostBuffer { shape: vec![b], data: HostData::I64(vec![1; b]) },
                "positions" => HostBuffer { shape: vec![b], data: HostData::I64(vec![context as i64 - 1; b]) },
                v3c_runtime::plan::PAGE_POOL => pool.table(pages).map_err(Failure::Other)?,
                cache if cache.starts_with("kv_cache.") => {
                    let width = *shape.last().unwrap_or(&0);
                    let paged = bounds.contains_key(v3c_runtime::plan::PAGE_POOL);
                    let shape = if paged { vec![b * pages, 64, width] } else { vec![b, cache_rows, width] };
                    let n = shape.iter().product();
                    HostBuffer { shape, data: HostData::F32(vec![0.0; n]) }
                }
                other => {
                    return Err(Failure::Other(format!(
                        "the decode entry has an input {other} this bench does not fill"
                    )))
                }
            };
            inputs.insert(name.clone(), buffer);
        }
        let logits = format!("logits{}", v3c_runtime::plan::NO_ROWS);
        let wanted: &[&str] = if args.all_launches { &[] } else { &[&logits, v3c_runtime::plan::ONLY_WANTED] };
        let what = format!("decode batch {b:3} context {context}");
        let point = serde_json::json!({"batch": b, "context": context});
        report.push(time_point(program.as_ref(), ("decode", &inputs, wanted), args.reps, b, (&what, "step"), point)?);
    }
    if let Some(out) = &args.out {
        write_bench_json(out, &args.artifact, &kind, args.random_weights.is_some(), "steps", report)?;
    }
    Ok(())
}

/// `v3r bench-prefill`: chunks of a prompt's prefill timed at (tokens, cached rows) points.
fn bench_prefill(args: &BenchPrefillArgs) -> Result<(), Failure> {
    use v3c_runtime::host::{HostBuffer, HostData};
    let (mut a, plan, kind) = open_bench(&args.artifact, "prefill", args.device)?;
    match (args.plan_rows_kernels, a.lowering.as_mut()) {
        (true, Some(lowering)) => lowering.without_smaller_prefill_kernels(),
        (true, None) => {
            return Err(Failure::Other(format!(
                "--plan-rows-kernels: {} is a cpu artifact; its GEMMs have no kernels picked per rows",
                args.artifact.display()
            )))
        }
        (false, _) => {}
    }
    let (rows, plan_context) = (plan.sizes.rows, plan.sizes.context);
    let chunks = if args.tokens.is_empty() { vec![rows] } else { args.tokens.clone() };
    if let Some(&t) = chunks.iter().find(|&&t| t == 0 || t > rows) {
        return Err(Failure::Other(format!(
            "--tokens {t}: the prefill plan takes 1..={rows} tokens a chunk (compile with a larger --max-rows)"
        )));
    }
    if let Some(&c) = args.context.iter().find(|&&c| c > plan_context) {
        return Err(Failure::Other(format!(
            "--context {c}: the prefill plan holds 0..={plan_context} cached rows (compile with a larger --max-context)"
        )));
    }
    let vocab = vocabulary(&a).clamp(1, u64::from(u32::MAX));
    let program = load_bench(a, args.weights.as_deref(), args.random_weights, args.device, &kind, false)?;
    let mut random = splitmix64(args.seed);
    let ids = |v: Vec<i64>| HostBuffer { shape: vec![v.len()], data: HostData::I64(v) };
    let mut report = Vec::new();
    for &context in &args.context {
        for &t in &chunks {
            // The prompt: its cached rows' tokens never run (zero cache rows stand for them), the
            // chunk's and the one after it (the MTP module's input) drawn.
            let prompt: Vec<i64> = (0..=t).map(|_| (random() % vocab) as i64).collect();
            let mut inputs = std::collections::HashMap::new();
            for (name, shape) in &plan.bounds {
                let buffer = match name.as_str() {
                    "tokens" => ids(prompt[..t].to_vec()),
                    "mtp_tokens" => ids(prompt[1..].to_vec()),
                    "positions" => ids((context as i64..(context + t) as i64).collect()),
                    cache if cache.starts_with("kv_cache.") && shape.len() == 2 => HostBuffer {
                        shape: vec![context, shape[1]],
                        data: HostData::F32(vec![0.0; context * shape[1]]),
                    },
                    other => {
                        return Err(Failure::Other(format!(
                            "the prefill entry has an input {other} this bench does not fill"
                        )))
                    }
                };
                inputs.insert(name.clone(), buffer);
            }
            // What a prompt's last chunk runs: its caches written, the last row's logits.
            let logits = format!("logits{}", v3c_runtime::plan::LAST_ROW);
            let caches = plan.bounds.keys().filter(|n| n.starts_with("kv_cache."));
            let only = (!args.all_launches).then_some(v3c_runtime::plan::ONLY_WANTED);
            let wanted: Vec<&str> = caches.map(String::as_str).chain([logits.as_str()]).chain(only).collect();
            let what = format!("prefill {t:5} tokens after {context:5} cached");
            let mut point = serde_json::json!({"tokens": t, "context": context});
            if args.all_launches {
                point["all_launches"] = true.into();
            }
            if args.plan_rows_kernels {
                point["plan_rows_kernels"] = true.into();
            }
            report.push(time_point(
                program.as_ref(),
                ("prefill", &inputs, &wanted),
                args.reps,
                t,
                (&what, "chunk"),
                point,
            )?);
        }
    }
    if let Some(out) = &args.out {
        write_bench_json(out, &args.artifact, &kind, args.random_weights.is_some(), "chunks", report)?;
    }
    Ok(())
}

/// A stream of pseudo-random numbers from `seed` (splitmix64): the benches' made-up prompts.
fn splitmix64(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// An artifact opened to time its entry `entry`: the artifact, a copy of that entry's plan and what
/// it runs on, in words (a GPU artifact's device probed first).
fn open_bench(
    artifact: &std::path::Path,
    entry: &str,
    device: usize,
) -> Result<(v3c_runtime::artifact::Artifact, v3c_runtime::plan::EntryPlan, String), Failure> {
    let a = v3c_runtime::artifact::Artifact::open(artifact).map_err(|e| Failure::Other(e.to_string()))?;
    let gpu = a.manifest.target.name != "cpu";
    if gpu {
        device::probe_device(device).map_err(|e| Failure::NoDevice(e.to_string()))?;
    }
    let plan = a
        .plan
        .entries
        .iter()
        .find(|e| e.name == entry)
        .cloned()
        .ok_or(Failure::Other(format!("{}: no {entry} entry", artifact.display())))?;
    let kind = format!(
        "{} artifact{}",
        a.manifest.target.name,
        if gpu { format!(" on cuda:{device}") } else { String::new() }
    );
    Ok((a, plan, kind))
}

/// Times runs of an entry (`reps` after a warm-up: [`v3c_runtime::session::Program::time_entry`])
/// that each process `tokens`: prints `what` with the median ms per `unit` (the spread beside it)
/// and tokens/s, and gives `point` with those figures added.
fn time_point(
    program: &dyn v3c_runtime::session::Program,
    (entry, inputs, wanted): (&str, &std::collections::HashMap<String, v3c_runtime::host::HostBuffer>, &[&str]),
    reps: usize,
    tokens: usize,
    (what, unit): (&str, &str),
    mut point: serde_json::Value,
) -> Result<serde_json::Value, Failure> {
    let mut times = program.time_entry(entry, inputs, wanted, reps.max(1)).map_err(Failure::Other)?;
    times.sort_by(f64::total_cmp);
    let (median, min, max) = (times[times.len() / 2], times[0], times[times.len() - 1]);
    let tokens_per_s = tokens as f64 / (median * 1e-3);
    println!(
        "{what}: {median:9.3} ms per {unit} (median of {}; {min:.3}..{max:.3}), {tokens_per_s:10.1} tokens/s",
        times.len()
    );
    let figures = serde_json::json!({
        "median_ms": median, "min_ms": min, "max_ms": max, "reps": times.len(), "tokens_per_s": tokens_per_s,
    });
    if let (Some(point), serde_json::Value::Object(figures)) = (point.as_object_mut(), figures) {
        point.extend(figures);
    }
    Ok(point)
}

/// Writes a bench's figures as JSON to `out`: the artifact, what ran it, where the weights came
/// from and the points under `key`.
fn write_bench_json(
    out: &std::path::Path,
    artifact: &std::path::Path,
    kind: &str,
    random: bool,
    key: &str,
    points: Vec<serde_json::Value>,
) -> Result<(), Failure> {
    let json = serde_json::json!({
        "artifact": artifact.display().to_string(),
        "target": kind,
        "weights": if random { "random" } else { "checkpoint" },
        key: points,
    });
    let text = serde_json::to_string_pretty(&json).map_err(|e| Failure::Other(e.to_string()))? + "\n";
    std::fs::write(out, text).map_err(|e| Failure::Other(format!("{}: {e}", out.display())))
}

/// Where a timing command's weights come from: a checkpoint (checked against the artifact's plan
/// first) or made-up values from a seed.
enum WeightSource {
    Checkpoint(v3c_models::checkpoint::Checkpoint),
    Random(u64),
}

impl WeightSource {
    fn open(
        a: &v3c_runtime::artifact::Artifact,
        dir: Option<&std::path::Path>,
        random: Option<u64>,
    ) -> Result<WeightSource, Failure> {
        match (dir, random) {
            (Some(dir), _) => {
                a.check_weights(dir).map_err(Failure::Other)?;
                let ckpt = v3c_models::checkpoint::Checkpoint::open(dir).map_err(|e| Failure::Other(e.to_string()))?;
                Ok(WeightSource::Checkpoint(ckpt))
            }
            (None, Some(seed)) => Ok(WeightSource::Random(seed)),
            (None, None) => Err(Failure::Other("--weights or --random-weights".into())),
        }
    }

    fn weights(&self) -> v3c_runtime::gpu::Weights<'_> {
        match self {
            WeightSource::Checkpoint(ckpt) => v3c_runtime::gpu::Weights::Checkpoint(ckpt),
            WeightSource::Random(seed) => v3c_runtime::gpu::Weights::Random(*seed),
        }
    }
}

/// An artifact loaded to be timed, with a checkpoint's weights or made-up ones from `random`
/// (a GPU one on device `ordinal`); says how long it took.
fn load_bench(
    a: v3c_runtime::artifact::Artifact,
    weights: Option<&std::path::Path>,
    random: Option<u64>,
    ordinal: usize,
    kind: &str,
    pick_on_host: bool,
) -> Result<Box<dyn v3c_runtime::session::Program>, Failure> {
    let source = WeightSource::open(&a, weights, random)?;
    let weights = source.weights();
    let start = std::time::Instant::now();
    let program: Box<dyn v3c_runtime::session::Program> = if a.manifest.target.name != "cpu" {
        let (bar, mut tick) = load_progress(&a);
        let loaded = v3c_runtime::cuda::GpuArtifact::load_weights(a, &weights, ordinal, &mut tick);
        bar.finish_and_clear();
        let loaded = loaded.map_err(Failure::Other)?;
        loaded.pick_on_host(pick_on_host);
        Box::new(loaded)
    } else {
        Box::new(v3c_runtime::cpu::CpuArtifact::load_weights(a, &weights).map_err(Failure::Other)?)
    };
    eprintln!("loaded in {:.2} s ({kind})", start.elapsed().as_secs_f64());
    Ok(program)
}

/// A progress line for loading a GPU artifact (kernels, weights read, prepared weights): drawn on a
/// terminal only; each step is also logged at debug level.
fn load_progress(a: &v3c_runtime::artifact::Artifact) -> (indicatif::ProgressBar, impl FnMut(&str)) {
    let weights: std::collections::BTreeSet<&str> = a
        .plan
        .entries
        .iter()
        .flat_map(|e| &e.buffers)
        .filter_map(|b| match &b.kind {
            v3c_runtime::plan::BufferKind::Weight { name } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    let bar = indicatif::ProgressBar::new((a.manifest.kernels.len() + weights.len()) as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("loading [{bar:30}] {pos}/~{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let b = bar.clone();
    (bar, move |what: &str| {
        tracing::debug!("{what}");
        b.inc(1);
        b.set_message(what.to_string());
    })
}

fn tune(args: &TuneArgs) -> Result<(), Failure> {
    // The candidate set first (a wrong directory is said as such on any machine), then the GPU.
    v3c_runtime::tuning::Candidates::read(&args.dir).map_err(Failure::Other)?;
    device::probe_device(args.device).map_err(|e| Failure::NoDevice(e.to_string()))?;
    let written =
        v3c_runtime::measure::tune(&args.dir, &args.out, args.reps.max(1), args.device, args.again, &mut |line| {
            println!("{line}")
        })
        .map_err(Failure::Other)?;
    eprintln!("tune: {written} entries written to {}", args.out.display());
    Ok(())
}

/// `v3r train`: the training run of `v3c train` on a training-step artifact — a cpu one here, a
/// GPU one on device `--device` (exit 3 without a GPU); the loss weights and precision are the
/// artifact's (its manifest's `training`).
fn train(args: &TrainArgs) -> Result<(), Failure> {
    use v3c_runtime::training::{ArtifactStep, Run, RunOptions, TRAIN_ENTRY};
    let a = v3c_runtime::artifact::Artifact::open(&args.artifact).map_err(|e| Failure::Other(e.to_string()))?;
    let dir = args.artifact.display();
    let info = a.manifest.training.clone().ok_or_else(|| {
        Failure::Other(format!("{dir}: not a training-step artifact (compile one with `v3c compile --train`)"))
    })?;
    let on_gpu = a.manifest.target.name != "cpu";
    if on_gpu {
        // Before anything is read or written: a GPU artifact needs the GPU.
        device::probe_device(args.device).map_err(|e| Failure::NoDevice(e.to_string()))?;
    }
    let planned = a.plan.entries.iter().find(|e| e.name == TRAIN_ENTRY).map(|e| e.sizes.rows).unwrap_or(0);
    let options = RunOptions {
        model_dir: &args.weights,
        data: &args.run.data,
        steps: args.run.steps,
        out: &args.run.out,
        batch: args.run.batch,
        seq: args.seq.unwrap_or(planned),
        lr: args.run.lr,
        seed: args.run.seed,
        resume: args.run.resume,
        save_every: args.run.save_every,
        mtp_weight: info.mtp_weight,
        balance_alpha: info.balance_alpha,
        fp8: info.fp8,
        optimizer: args.run.optimizer(),
        eval: args.run.eval(),
        tokenizer: args.run.tokenizer.as_deref(),
    };
    let run = Run::prepare(&options).map_err(Failure::Other)?;
    // The artifact's weights are the trainer's parameters (read once, bound again at every step).
    let weights = v3c_runtime::gpu::Weights::Params(&run.trainer.params);
    if !on_gpu {
        let artifact = v3c_runtime::cpu::CpuArtifact::load_weights(a, &weights).map_err(Failure::Other)?;
        let mut step = ArtifactStep::new(artifact, &run.trainer, options.seq).map_err(Failure::Other)?;
        return run.execute(&options, &mut step, "cpu artifact").map_err(Failure::Other);
    }
    // On the GPU: the step's launches on the device, and there the optimizer with the parameters
    // and moments (--host-optimizer: AdamW on the host, parameters uploaded into the bound weights
    // at every step, gradients read back).
    let ordinal = args.device;
    let (bar, mut tick) = load_progress(&a);
    let gpu = v3c_runtime::cuda::GpuArtifact::load_weights(a, &weights, ordinal, &mut tick).map_err(Failure::Other)?;
    bar.finish_and_clear();
    let mut step = gpu_step(ArtifactStep::new(gpu, &run.trainer, options.seq), args.host_optimizer)?;
    let optimizer = if step.optimizes_on_device() { "AdamW on the device" } else { "AdamW on the host" };
    run.execute(&options, &mut step, &format!("sm_90a artifact on cuda:{ordinal}, {optimizer}")).map_err(Failure::Other)
}

/// A GPU artifact's training step with the optimizer on its device, unless `host_optimizer`.
fn gpu_step<R: v3c_runtime::training::EntryRunner>(
    step: Result<v3c_runtime::training::ArtifactStep<R>, String>,
    host_optimizer: bool,
) -> Result<v3c_runtime::training::ArtifactStep<R>, Failure> {
    let step = step.map_err(Failure::Other)?;
    if host_optimizer {
        return Ok(step);
    }
    step.on_device().map_err(Failure::Other)
}

/// `v3r bench-train`: whole optimizer steps of a training-step artifact timed part by part.
fn bench_train(args: &BenchTrainArgs) -> Result<(), Failure> {
    use v3c_runtime::training::{bench_steps, random_params, ArtifactStep, StepTiming, TRAIN_ENTRY};
    let a = v3c_runtime::artifact::Artifact::open(&args.artifact).map_err(|e| Failure::Other(e.to_string()))?;
    let dir = args.artifact.display().to_string();
    let info = a.manifest.training.clone().ok_or_else(|| {
        Failure::Other(format!("{dir}: not a training-step artifact (compile one with `v3c compile --train`)"))
    })?;
    let gpu = a.manifest.target.name != "cpu";
    if gpu {
        device::probe_device(args.device).map_err(|e| Failure::NoDevice(e.to_string()))?;
    }
    let config = v3c_models::config::ModelConfig::from_json_str(&a.manifest.model.config.to_string(), &dir)
        .map_err(|e| Failure::Other(format!("{dir}/manifest.json: model config: {e}")))?;
    let planned = a.plan.entries.iter().find(|e| e.name == TRAIN_ENTRY).map(|e| e.sizes.rows).unwrap_or(0);
    let seq = args.seq.unwrap_or(planned);
    let params = match (&args.weights, args.random_weights) {
        (Some(path), _) => {
            a.check_weights(path).map_err(Failure::Other)?;
            let ckpt = v3c_models::checkpoint::Checkpoint::open(path).map_err(|e| Failure::Other(e.to_string()))?;
            v3c_models::train::load_params(&config, &ckpt).map_err(|e| Failure::Other(e.to_string()))?
        }
        (None, Some(seed)) => random_params(&config, seed).map_err(Failure::Other)?,
        (None, None) => unreachable!("clap requires one"),
    };
    let train = v3c_models::train::TrainConfig {
        total_steps: args.steps.max(1),
        warmup_steps: 1,
        mtp_weight: info.mtp_weight,
        balance_alpha: info.balance_alpha,
        fp8: info.fp8,
        ..Default::default()
    };
    let mut trainer =
        v3c_models::train::Trainer::new(&config, params, train).map_err(|e| Failure::Other(format!("{dir}: {e}")))?;
    // The artifact's weights are the trainer's parameters (bound again at every step).
    let weights = v3c_runtime::gpu::Weights::Params(&trainer.params);
    let start = std::time::Instant::now();
    let mut report = |t: &StepTiming| {
        eprintln!(
            "step {}: {:.1} ms (parameters bound {:.1}, step run {:.1}, optimizer {:.1}), loss {:.4}",
            t.step, t.step_ms, t.bind_ms, t.run_ms, t.optimizer_ms, t.loss
        )
    };
    let (kind, optimizer, timings) = if gpu {
        let (bar, mut tick) = load_progress(&a);
        let loaded = v3c_runtime::cuda::GpuArtifact::load_weights(a, &weights, args.device, &mut tick);
        bar.finish_and_clear();
        eprintln!("loaded in {:.2} s", start.elapsed().as_secs_f64());
        let step = ArtifactStep::new(loaded.map_err(Failure::Other)?, &trainer, seq);
        let mut step = gpu_step(step, args.host_optimizer)?;
        let seed = args.random_weights.unwrap_or(0);
        let timings = bench_steps(&mut trainer, &mut step, args.batch, seq, args.steps, seed, &mut report);
        let optimizer = if step.optimizes_on_device() { "device" } else { "host" };
        (format!("sm_90a artifact on cuda:{}, AdamW on the {optimizer}", args.device), optimizer, timings)
    } else {
        let loaded = v3c_runtime::cpu::CpuArtifact::load_weights(a, &weights).map_err(Failure::Other)?;
        eprintln!("loaded in {:.2} s", start.elapsed().as_secs_f64());
        let mut step = ArtifactStep::new(loaded, &trainer, seq).map_err(Failure::Other)?;
        let seed = args.random_weights.unwrap_or(0);
        let timings = bench_steps(&mut trainer, &mut step, args.batch, seq, args.steps, seed, &mut report);
        ("cpu artifact".to_string(), "host", timings)
    };
    let timings = timings.map_err(|e| Failure::Other(format!("{dir}: {e}")))?;
    // The first step loads kernels and warms caches: the medians are of the others (when any).
    let timed = if timings.len() > 1 { &timings[1..] } else { &timings[..] };
    let median = |f: &dyn Fn(&StepTiming) -> f64| {
        let mut v: Vec<f64> = timed.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (step_ms, bind_ms, run_ms, optimizer_ms) =
        (median(&|t| t.step_ms), median(&|t| t.bind_ms), median(&|t| t.run_ms), median(&|t| t.optimizer_ms));
    let tokens = args.batch * seq;
    let tokens_per_s = tokens as f64 / (step_ms * 1e-3);
    println!(
        "train step of {} x {seq} tokens: {step_ms:.1} ms (median of {}; parameters bound {bind_ms:.1}, step run \
         {run_ms:.1}, optimizer {optimizer_ms:.1}), {tokens_per_s:.1} tokens/s ({kind}, {})",
        args.batch,
        timed.len(),
        if info.fp8 { "FP8 GEMMs" } else { "f32" }
    );
    if let Some(out) = &args.out {
        let json = serde_json::json!({
            "artifact": dir,
            "target": kind,
            "precision": if info.fp8 { "fp8" } else { "f32" },
            "optimizer": optimizer,
            "weights": if args.random_weights.is_some() { "random" } else { "checkpoint" },
            "batch": args.batch,
            "seq": seq,
            "median_step_ms": step_ms,
            "median_bind_ms": bind_ms,
            "median_run_ms": run_ms,
            "median_optimizer_ms": optimizer_ms,
            "tokens_per_s": tokens_per_s,
            "steps": timings,
        });
        let text = serde_json::to_string_pretty(&json).map_err(|e| Failure::Other(e.to_string()))? + "\n";
        std::fs::write(out, text).map_err(|e| Failure::Other(format!("{}: {e}", out.display())))?;
    }
    Ok(())
}
