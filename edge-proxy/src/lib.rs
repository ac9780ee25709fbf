//! The regional edge proxy (`devmesh edge`): TLS termination for a region's
//! app domain, local app-token verification, and the region's relay. Its
//! implementation arrives with the edge issue; the crate exists so the
//! workspace layout is final from the start.

#![forbid(unsafe_code)]
