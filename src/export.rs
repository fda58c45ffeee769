//! `fluxo entries export` and `fluxo balances export`: a server-streaming
//! export over gRPC written as the same CSV the REST download routes answer
//! ([`fluxo_proto::export`]), with a progress spinner on stderr.
//!
//! With `--output FILE` the CSV goes to `FILE.partial` and is renamed to
//! `FILE` only once the stream ended without error, so a file under the
//! name asked for is always a whole export. Without it, the CSV goes to
//! stdout, and a failed export ends with a non-zero exit status.

use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, bail};
use fluxo_proto::{
    balance_v1::{self as bpb, balance_service_client::BalanceServiceClient},
    export::{CsvWriter, Table},
    ledger_v1::{self as lpb, ledger_service_client::LedgerServiceClient},
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client::{ClientArgs, describe};

/// An entry type, as `--type` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EntryType {
    /// Money in.
    Credit,
    /// Money out.
    Debit,
}

/// `fluxo entries export` arguments.
#[derive(Debug, clap::Args)]
pub struct EntriesExportArgs {
    /// The merchant whose entries are exported.
    #[arg(long, short = 'm')]
    pub merchant: String,
    /// Only entries booked on or after this date (YYYY-MM-DD).
    #[arg(long, value_name = "DATE")]
    pub from: Option<String>,
    /// Only entries booked on or before this date (YYYY-MM-DD).
    #[arg(long, value_name = "DATE")]
    pub to: Option<String>,
    /// Only entries of this type.
    #[arg(long = "type", value_enum)]
    pub kind: Option<EntryType>,
    /// Only entries carrying this label, as KEY=VALUE; repeat for several (all must match, at most 4).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Write the CSV to this file (through FILE.partial) instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `fluxo balances export` arguments.
#[derive(Debug, clap::Args)]
pub struct BalancesExportArgs {
    /// The merchant.
    #[arg(long, short = 'm')]
    pub merchant: String,
    /// First date, YYYY-MM-DD, inclusive.
    #[arg(long, value_name = "DATE")]
    pub from: String,
    /// Last date, YYYY-MM-DD, inclusive (no limit on the range's length).
    #[arg(long, value_name = "DATE")]
    pub to: String,
    /// ISO 4217 code; needed when the merchant books in several currencies.
    #[arg(long)]
    pub currency: Option<String>,
    /// Write the CSV to this file (through FILE.partial) instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn labels(pairs: &[String]) -> anyhow::Result<HashMap<String, String>> {
    let mut map = HashMap::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--label {pair:?} is not KEY=VALUE");
        };
        if map.insert(key.to_owned(), value.to_owned()).is_some() {
            bail!("--label {key} is given twice");
        }
    }
    Ok(map)
}

/// Runs `fluxo entries export`.
pub async fn entries(args: &EntriesExportArgs) -> anyhow::Result<()> {
    let request = lpb::ExportEntriesRequest {
        merchant_id: args.merchant.clone(),
        start_date: args.from.clone().unwrap_or_default(),
        end_date: args.to.clone().unwrap_or_default(),
        r#type: match args.kind {
            None => lpb::EntryType::Unspecified,
            Some(EntryType::Credit) => lpb::EntryType::Credit,
            Some(EntryType::Debit) => lpb::EntryType::Debit,
        }
        .into(),
        metadata: labels(&args.labels)?,
        ..Default::default()
    };
    let mut client = LedgerServiceClient::new(args.client.channel()?).max_decoding_message_size(64 << 20);
    let mut stream = client
        .export_entries(args.client.request(request)?)
        .await
        .map_err(|s| anyhow::anyhow!("ExportEntries failed: {}", describe(&s)))?
        .into_inner();
    let mut output = Output::open(Table::Entries, args.output.as_deref(), "entries")?;
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => output.write(|w| w.entries(&chunk.entries))?,
            Ok(None) => return output.finish(),
            Err(status) => return output.fail(&format!("ExportEntries failed: {}", describe(&status))),
        }
    }
}

/// Runs `fluxo balances export`.
pub async fn balances(args: &BalancesExportArgs) -> anyhow::Result<()> {
    let request = bpb::ExportDailyBalancesRequest {
        merchant_id: args.merchant.clone(),
        start_date: args.from.clone(),
        end_date: args.to.clone(),
        currency_code: args.currency.clone().unwrap_or_default(),
    };
    let mut client = BalanceServiceClient::new(args.client.channel()?).max_decoding_message_size(64 << 20);
    let mut stream = client
        .export_daily_balances(args.client.request(request)?)
        .await
        .map_err(|s| anyhow::anyhow!("ExportDailyBalances failed: {}", describe(&s)))?
        .into_inner();
    let mut output = Output::open(Table::DailyBalances, args.output.as_deref(), "days")?;
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => output.write(|w| w.balances(&chunk.balances))?,
            Ok(None) => return output.finish(),
            Err(status) => {
                return output.fail(&format!("ExportDailyBalances failed: {}", describe(&status)));
            }
        }
    }
}

/// Where the CSV goes, and the progress shown while it does.
struct Output {
    csv: CsvWriter<Box<dyn Write>>,
    /// (FILE.partial, FILE) with --output.
    file: Option<(PathBuf, PathBuf)>,
    bar: ProgressBar,
    started: Instant,
    noun: &'static str,
}

impl Output {
    fn open(table: Table, path: Option<&Path>, noun: &'static str) -> anyhow::Result<Self> {
        let (sink, file): (Box<dyn Write>, _) = match path {
            Some(path) => {
                let mut partial = path.as_os_str().to_owned();
                partial.push(".partial");
                let partial = PathBuf::from(partial);
                let f = std::fs::File::create(&partial)
                    .with_context(|| format!("cannot create {}", partial.display()))?;
                (Box::new(std::io::BufWriter::with_capacity(1 << 16, f)), Some((partial, path.to_owned())))
            }
            None => (Box::new(std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock())), None),
        };
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{{spinner}} {{human_pos}} {noun}  {{per_sec}}  {{elapsed}}"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        let csv = CsvWriter::new(table, sink)?;
        Ok(Self { csv, file, bar, started: Instant::now(), noun })
    }

    fn write(
        &mut self,
        rows: impl FnOnce(&mut CsvWriter<Box<dyn Write>>) -> Result<(), fluxo_proto::export::ExportError>,
    ) -> anyhow::Result<()> {
        rows(&mut self.csv).context("writing the CSV")?;
        self.bar.set_position(self.csv.rows());
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.csv.flush().context("writing the CSV")?;
        self.bar.finish_and_clear();
        let rows = self.csv.rows();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        drop(self.csv);
        let place = match &self.file {
            Some((partial, path)) => {
                std::fs::rename(partial, path)
                    .with_context(|| format!("cannot rename {} to {}", partial.display(), path.display()))?;
                path.display().to_string()
            }
            None => "stdout".to_owned(),
        };
        #[allow(clippy::float_arithmetic, clippy::cast_precision_loss)]
        let rate = rows as f64 / secs;
        eprintln!("exported {rows} {} to {place} in {secs:.1} s ({rate:.0}/s)", self.noun);
        Ok(())
    }

    fn fail(mut self, why: &str) -> anyhow::Result<()> {
        let _ = self.csv.flush();
        self.bar.abandon();
        let rows = self.csv.rows();
        match &self.file {
            Some((partial, _)) => {
                bail!("{why} after {rows} {}; what was written is in {}", self.noun, partial.display())
            }
            None => bail!("{why} after {rows} {}: the CSV on stdout is incomplete", self.noun),
        }
    }
}
