//! Training rows from the pack stage's Parquet, epoch shuffling, and micro-batch assembly.
//!
//! A row is one packed bin (or one sample when packing is off) with `input_ids`, `labels` (-100 =
//! not trained, unshifted) and `position_ids` (restarting at 0 at each packed sample). Segment ids
//! are derived from the position ids, so samples packed in one row never attend to each other.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int32Type};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::TrainError;
use super::batch::TrainBatch;
use super::rng::SplitMix64;

/// Label value that excludes a position from the loss (Hugging Face convention).
pub const IGNORE_INDEX: i32 = -100;

/// One training row given by value (tests and small callers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRow {
    /// Token ids.
    pub input_ids: Vec<i32>,
    /// Unshifted labels, -100 where not trained.
    pub labels: Vec<i32>,
    /// Position ids, restarting at 0 at each packed sample.
    pub position_ids: Vec<i32>,
}

/// All training rows, stored flat (three columns and row offsets) to keep memory compact.
#[derive(Debug, Clone, Default)]
pub struct TrainData {
    input_ids: Vec<i32>,
    labels: Vec<i32>,
    position_ids: Vec<i32>,
    offsets: Vec<usize>,
    /// Micro-batches are at least this wide (see [`TrainData::pad_batches_to`]).
    pad_width: usize,
    /// Micro-batches have at least this many rows.
    pad_rows: usize,
}

/// Host-side counts of one micro-batch, used for metrics (tokens/s, MFU).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Non-padding input tokens.
    pub tokens: usize,
    /// Sum over packed samples of length², the attention term of the FLOP count.
    pub sum_sq_sample_len: u64,
}

impl TrainData {
    /// Builds the data set from rows; every row needs equal-length, non-empty columns.
    pub fn from_rows(rows: Vec<PackedRow>) -> Result<Self, TrainError> {
        let mut data = TrainData { offsets: vec![0], ..Default::default() };
        for (i, row) in rows.into_iter().enumerate() {
            data.push(i, row.input_ids, row.labels, Some(row.position_ids))?;
        }
        Ok(data)
    }

    /// Reads one Parquet file, or every `*.parquet` file of a directory in name order.
    pub fn from_parquet(path: &Path) -> Result<Self, TrainError> {
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| TrainError::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
                .collect();
            v.sort();
            v
        } else {
            vec![path.to_path_buf()]
        };
        let mut data = TrainData { offsets: vec![0], ..Default::default() };
        for file in &files {
            data.read_parquet_file(file)?;
        }
        Ok(data)
    }

    fn read_parquet_file(&mut self, path: &Path) -> Result<(), TrainError> {
        let bad = |msg: String| TrainError::Data(format!("{}: {msg}", path.display()));
        let file = File::open(path).map_err(|e| TrainError::io(path, e))?;
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(file).and_then(|b| b.build()).map_err(|e| bad(e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| bad(e.to_string()))?;
            let ids = list_column(&batch, "input_ids").map_err(&bad)?;
            let labels = list_column(&batch, "labels").map_err(&bad)?;
            let positions = list_column(&batch, "position_ids").map_err(&bad)?;
            let (Some(ids), Some(labels)) = (ids, labels) else {
                return Err(bad("needs list columns `input_ids` and `labels`".into()));
            };
            let mut positions = positions.map(|p| p.into_iter());
            for (ids, labels) in ids.into_iter().zip(labels) {
                let pos = positions.as_mut().and_then(|p| p.next());
                let row = self.len();
                self.push(row, ids, labels, pos).map_err(|e| bad(e.to_string()))?;
            }
        }
        Ok(())
    }

    fn push(
        &mut self,
        row: usize,
        ids: Vec<i32>,
        labels: Vec<i32>,
        positions: Option<Vec<i32>>,
    ) -> Result<(), TrainError> {
        let n = ids.len();
        let positions = positions.unwrap_or_else(|| (0..n as i32).collect());
        if n == 0 || labels.len() != n || positions.len() != n {
            return Err(TrainError::Data(format!(
                "row {row}: input_ids, labels and position_ids need the same non-zero length \
                 (got {n}, {}, {})",
                labels.len(),
                positions.len()
            )));
        }
        self.input_ids.extend(ids);
        self.labels.extend(labels);
        self.position_ids.extend(positions);
        self.offsets.push(self.input_ids.len());
        Ok(())
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `i` as (input_ids, labels, position_ids) slices.
    pub fn row(&self, i: usize) -> (&[i32], &[i32], &[i32]) {
        let r = self.offsets[i]..self.offsets[i + 1];
        (&self.input_ids[r.clone()], &self.labels[r.clone()], &self.position_ids[r])
    }

    /// Row visiting order of one epoch: a seeded Fisher-Yates shuffle that depends only on
    /// (seed, epoch), so a resumed run sees the same order without saving RNG state.
    pub fn epoch_order(&self, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        if shuffle {
            let mut rng = SplitMix64::new(SplitMix64::mix(seed, 0x5eed_0000 + epoch as u64));
            for i in (1..order.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
        }
        order
    }

    /// Pads every micro-batch to at least `width` tokens and `rows` rows (Axolotl's
    /// `pad_to_sequence_len`): every batch then has one shape, whatever the lengths of its rows
    /// and however many rows are left at the end of an epoch. On a JIT backend each new shape
    /// costs kernel compilations (a minute and more on the first meeting); padding costs only the
    /// padded positions' arithmetic and changes no loss or gradient (padding carries no labels
    /// and attends only to itself).
    pub fn pad_batches_to(mut self, width: usize, rows: usize) -> Self {
        self.pad_width = width;
        self.pad_rows = rows;
        self
    }

    /// Counts of the rows `indices` (non-padding tokens, Σ sample length²).
    pub fn stats(&self, indices: &[usize]) -> BatchStats {
        let mut s = BatchStats::default();
        for &i in indices {
            let (ids, _, pos) = self.row(i);
            s.tokens += ids.len();
            for len in segment_lengths(pos) {
                s.sum_sq_sample_len += (len as u64) * (len as u64);
            }
        }
        s
    }

    /// Assembles rows `indices` into a micro-batch padded to its longest row, or to the width and
    /// row count of [`TrainData::pad_batches_to`] (pad: token 0, label -100, position 0,
    /// segment 0). Segment ids count packed samples from 1 within a row.
    pub fn micro_batch<B: Backend>(&self, indices: &[usize], device: &B::Device) -> TrainBatch<B> {
        let longest = indices.iter().map(|&i| self.offsets[i + 1] - self.offsets[i]).max().unwrap_or(0);
        let width = longest.max(self.pad_width);
        let rows = indices.len().max(self.pad_rows);
        let mut ids = vec![0i64; rows * width];
        let mut labels = vec![IGNORE_INDEX as i64; rows * width];
        let mut pos = vec![0i64; rows * width];
        let mut seg = vec![0i64; rows * width];
        for (r, &i) in indices.iter().enumerate() {
            let (row_ids, row_labels, row_pos) = self.row(i);
            let base = r * width;
            let mut segment = 0i64;
            for t in 0..row_ids.len() {
                if starts_segment(row_pos, t) {
                    segment += 1;
                }
                ids[base + t] = row_ids[t] as i64;
                labels[base + t] = row_labels[t] as i64;
                pos[base + t] = row_pos[t] as i64;
                seg[base + t] = segment;
            }
        }
        let shape = [rows, width];
        let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), device);
        let host_targets = Some(crate::llama::shift_within_segments(&labels, &seg, width));
        TrainBatch {
            input_ids: int(ids),
            labels: int(labels),
            position_ids: int(pos),
            segment_ids: int(seg),
            host_targets,
        }
    }
}

/// A new packed sample starts at position 0, or wherever the positions do not continue by +1.
fn starts_segment(pos: &[i32], t: usize) -> bool {
    t == 0 || pos[t] == 0 || pos[t] != pos[t - 1] + 1
}

/// Lengths of the packed samples of one row.
fn segment_lengths(pos: &[i32]) -> Vec<usize> {
    let mut lens = Vec::new();
    for t in 0..pos.len() {
        if starts_segment(pos, t) {
            lens.push(0);
        }
        if let Some(l) = lens.last_mut() {
            *l += 1;
        }
    }
    lens
}

/// Reads a `list<int32|int64>` (or large list) column as rows of i32; None if the column is absent.
fn list_column(batch: &RecordBatch, name: &str) -> Result<Option<Vec<Vec<i32>>>, String> {
    let Some(col) = batch.column_by_name(name) else {
        return Ok(None);
    };
    let (offsets, values): (Vec<usize>, ArrayRef) = match col.data_type() {
        DataType::List(_) => {
            let l = col.as_list::<i32>();
            let o = l.value_offsets().iter().map(|&o| o as usize).collect();
            (o, l.values().clone())
        }
        DataType::LargeList(_) => {
            let l = col.as_list::<i64>();
            let o = l.value_offsets().iter().map(|&o| o as usize).collect();
            (o, l.values().clone())
        }
        other => return Err(format!("column `{name}` is {other}, expected list<int32>")),
    };
    if col.null_count() > 0 {
        return Err(format!("column `{name}` has null rows"));
    }
    let values = arrow::compute::cast(&values, &DataType::Int32).map_err(|e| format!("column `{name}`: {e}"))?;
    let values = values.as_primitive::<Int32Type>();
    let rows = offsets.windows(2).map(|w| values.values()[w[0]..w[1]].to_vec()).collect();
    Ok(Some(rows))
}
