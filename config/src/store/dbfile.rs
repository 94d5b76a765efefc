//! A redb file the process can let go of for a while. On a reload the new process must open the
//! store file (redb locks it) while this one still finishes its requests; if the new process
//! fails, this one takes the file back and goes on.

use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use redb::{Builder, Database, ReadTransaction, ReadableDatabase, WriteTransaction};

use super::embedded::backend;
use crate::error::StoreError;

/// How long an open waits for a file another process (or a store dropped a moment ago in this
/// one) still holds: long enough for a writer finishing a commit whose fsync waits behind a
/// busy disk.
const OPEN_WAIT: Duration = Duration::from_secs(10);

pub(super) struct DbFile {
    db: RwLock<Option<Database>>,
    path: PathBuf,
    cache_size: usize,
}

fn released() -> StoreError {
    StoreError::Unavailable(
        "this process handed the store file to the process that replaces it (a reload)".into(),
    )
}

fn open(path: &Path, cache_size: usize) -> Result<Database, StoreError> {
    let mut builder = Builder::new();
    builder.set_cache_size(cache_size);
    let deadline = Instant::now() + OPEN_WAIT;
    loop {
        match builder.create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(db) => return Ok(db),
            Err(e) => {
                return Err(StoreError::Open {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                });
            }
        }
    }
}

impl DbFile {
    /// Opens (or creates) the file; blocks, so call it off the runtime.
    pub fn open(path: &Path, cache_size: usize) -> Result<Self, StoreError> {
        Ok(DbFile {
            db: RwLock::new(Some(open(path, cache_size)?)),
            path: path.to_path_buf(),
            cache_size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn begin_read(&self) -> Result<ReadTransaction, StoreError> {
        match &*self.db.read().unwrap_or_else(PoisonError::into_inner) {
            Some(db) => db.begin_read().map_err(backend),
            None => Err(released()),
        }
    }

    pub fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        match &*self.db.read().unwrap_or_else(PoisonError::into_inner) {
            Some(db) => db.begin_write().map_err(backend),
            None => Err(released()),
        }
    }

    /// Closes the file. redb's close waits for a write transaction in flight; read
    /// transactions still open keep the file a moment longer, which the other process's open
    /// waits out. Blocks.
    pub fn release(&self) {
        let db = self
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(db);
    }

    /// Opens the file again after [`DbFile::release`]; nothing to do when it is open. Blocks.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(open(&self.path, self.cache_size)?);
        }
        Ok(())
    }
}
