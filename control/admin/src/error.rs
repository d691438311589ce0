//! The crate's errors: the store's, and what a change through [`crate::Control`]
//! can answer (each maps to one HTTP status in [`crate::api`]).

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no (I/O, corruption, constraint).
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL said no.
    #[error("store: postgres: {0}")]
    Postgres(String),
    /// The store cannot be reached now (PostgreSQL down, the connection
    /// lost): writes wait (usage) or are refused with 503 (the API).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The file was written by a newer splicegate.
    #[error(
        "store: schema version {have} is newer than this build knows ({known}); a splicegate that knows version {have} is needed"
    )]
    TooNew {
        /// The file's version.
        have: i64,
        /// This build's.
        known: i64,
    },
    /// A new object's id is taken (another gateway of the fleet made one
    /// with it first): 409.
    #[error("{0}")]
    Exists(String),
    /// A stored declaration no longer reads.
    #[error("store: stored {what} {id} does not read: {reason}")]
    Corrupt {
        /// `package` or `node`.
        what: &'static str,
        /// Its id.
        id: String,
        /// Why.
        reason: String,
    },
}

/// Why a change through the control object was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such object (404).
    #[error("{0}")]
    NotFound(String),
    /// The object exists, or belongs to the config file (409).
    #[error("{0}")]
    Conflict(String),
    /// The change does not make a valid policy (422).
    #[error("{0}")]
    Invalid(String),
    /// The store failed (500).
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Exists(m) => ControlError::Conflict(m),
            e => ControlError::Store(e),
        }
    }
}

impl From<splicegate_control::decl::DeclError> for ControlError {
    fn from(e: splicegate_control::decl::DeclError) -> Self {
        ControlError::Invalid(e.to_string())
    }
}

impl From<rusqlite::Error> for ControlError {
    fn from(e: rusqlite::Error) -> Self {
        ControlError::Store(StoreError::Sqlite(e))
    }
}

/// Why a device could not enrol ([`crate::Control::enrol_agent`]). Nothing
/// was created in any case; only [`EnrolError::Unavailable`] may succeed
/// when tried again as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrolError {
    /// A node (of any kind, the file's or the API's) has this id.
    #[error("node id {0} is taken")]
    Taken(String),
    /// An agent node of this id was deleted: the id never enrols again.
    #[error("node id {0} was deleted and is revoked")]
    Revoked(String),
    /// The id or an announced attribute is not acceptable; the message
    /// names which and why.
    #[error("{0}")]
    Invalid(String),
    /// The store could not record the node now (unreachable, failed), or no
    /// key could be drawn; the message says what.
    #[error("enrolment failed for now: {0}")]
    Unavailable(String),
}

/// The message for changes to objects the config file declares.
pub const FROM_FILE: &str = "declared in the config file; change it there and reload";
