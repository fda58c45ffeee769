//! `fluxo entries watch`: follows a merchant's entries over WatchEntries and
//! writes them as CSV rows (export's columns) as they are committed, until
//! interrupted. When the stream ends — the server draining, this reader cut
//! off for being slow, the connection lost — it reconnects after a short
//! wait and resumes from the last cursor it wrote out, so no entry is
//! skipped or written twice. With `--cursor-file` the cursor survives the
//! process too: each batch is flushed before the file is replaced
//! (atomically), so a rerun continues exactly after what was written, without
//! a second header row (`>> entries.csv` stays one table).

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use fluxo_proto::{
    export::{CsvWriter, Table},
    ledger_v1::{self as lpb, ledger_service_client::LedgerServiceClient},
};
use tonic::Code;

use crate::client::{ClientArgs, describe};

/// `fluxo entries watch` arguments.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// The merchant whose entries are followed.
    #[arg(long, short = 'm')]
    pub merchant: String,
    /// Start after this cursor (from an earlier watch) instead of at the merchant's first entry.
    #[arg(long, conflicts_with = "from_end")]
    pub cursor: Option<String>,
    /// Start at the end: only entries committed from now on.
    #[arg(long)]
    pub from_end: bool,
    /// Keep the cursor in this file: read at start (when it exists and no --cursor is given),
    /// replaced after every batch written.
    #[arg(long, value_name = "FILE")]
    pub cursor_file: Option<PathBuf>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The longest wait between two reconnections.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Runs `fluxo entries watch` until interrupted, or until fluxo refuses the watch itself.
pub async fn entries(args: &WatchArgs) -> anyhow::Result<()> {
    let mut cursor = match (&args.cursor, &args.cursor_file) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(file)) if file.exists() => {
            let text =
                std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            Some(text.trim().to_owned()).filter(|c| !c.is_empty())
        }
        _ => None,
    };
    let mut client = LedgerServiceClient::new(args.client.channel()?).max_decoding_message_size(64 << 20);
    // A resumed watch continues an earlier output: the header row comes once, at the start.
    let mut csv = match cursor {
        None => CsvWriter::new(Table::Entries, std::io::stdout().lock())?,
        Some(_) => CsvWriter::continuing(Table::Entries, std::io::stdout().lock()),
    };
    csv.flush()?;
    let mut backoff = Duration::from_millis(200);
    loop {
        let request = lpb::WatchEntriesRequest {
            merchant_id: args.merchant.clone(),
            cursor: cursor.clone().unwrap_or_default(),
            start_at_end: cursor.is_none() && args.from_end,
        };
        let ended = match client.watch_entries(args.client.request(request)?).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(message)) => {
                            backoff = Duration::from_millis(200);
                            csv.entries(&message.entries)?;
                            csv.flush()?;
                            if let Some(file) = &args.cursor_file {
                                save(file, &message.cursor)?;
                            }
                            cursor = Some(message.cursor);
                        }
                        Ok(None) => break tonic::Status::unavailable("the watch ended"),
                        Err(status) => break status,
                    }
                }
            }
            Err(status) => status,
        };
        // What retrying cannot fix ends the command.
        if matches!(
            ended.code(),
            Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated | Code::NotFound
        ) {
            anyhow::bail!("WatchEntries failed: {}", describe(&ended));
        }
        eprintln!("fluxo entries watch: {}; resuming in {backoff:?}", describe(&ended));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Replaces `file` with `cursor`, through a temporary file beside it.
fn save(file: &Path, cursor: &str) -> anyhow::Result<()> {
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(cursor.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, file).with_context(|| format!("cannot replace {}", file.display()))?;
    Ok(())
}
