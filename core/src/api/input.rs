//! The one input decoder behind REST and gRPC: a protocol-neutral description of each input
//! and requested output becomes an engine `Tensor` or a shared-memory target.
//!
//! Each front end only reads its own wire format into an `InputDesc` (name, datatype, shape,
//! Triton's `shared_memory_*` parameters and where the data is: JSON `data`, a slice of the
//! binary section, a raw entry, typed contents) or an `OutputDesc`; the checks they share
//! live here once: the datatype and shape, the shape against the data's size, the data
//! source (exactly one), and shared-memory regions (an input lives in the client's region,
//! `Storage::Client`, its bytes left there; an output goes to a target in it). Messages name
//! each protocol's own fields (`Protocol`), so a client reads the words of the API it called.
//!
//! Signature checks (names, shapes against the model) belong to `engine::validate`; this
//! file only checks what the encoding itself promises.

use super::binary::BinaryData;
use super::contents;
use super::error::ApiError;
use super::json_data;
use crate::engine::{DataType, Tensor};
use crate::proto::InferTensorContents;
use crate::regions::{RegionError, Regions, read_input};
use crate::tensor::client_shm::OutputTarget;
use crate::tensor::{ClientSlice, Storage, element_count};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The API an input came through; it decides the wording of data-source errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// KServe V2 JSON, with Triton's binary tensor extension.
    Rest,
    /// KServe V2 gRPC (`ModelInferRequest`).
    Grpc,
}

/// One input as its front end read it, not yet checked.
pub struct InputDesc<'a> {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    /// Triton's shared-memory parameters; an `Err` when the front end could not read them
    /// (reported after the datatype and shape checks).
    pub shm: Result<ShmParameters, ApiError>,
    pub data: Data<'a>,
}

/// Where an input's data is, as the request gave it (besides shared memory, which its
/// parameters name).
pub enum Data<'a> {
    /// No data field.
    Absent,
    /// Two data fields at once (REST `data` and `binary_data_size`; gRPC `contents` and a
    /// `raw_input_contents` entry).
    Both,
    /// KServe JSON `data`, still raw JSON text.
    Json(&'a RawValue),
    /// `binary_data_size`: the next this many bytes of the binary section (REST).
    Binary(u64),
    /// One `raw_input_contents` entry (gRPC), little-endian bytes.
    Raw(Bytes),
    /// Typed `contents` (gRPC).
    Typed(InferTensorContents),
}

impl Data<'_> {
    /// Whether any data field was given (which contradicts a shared-memory region).
    fn given(&self) -> bool {
        match self {
            Data::Absent => false,
            Data::Typed(c) => !contents::is_empty(c),
            Data::Both | Data::Json(_) | Data::Binary(_) | Data::Raw(_) => true,
        }
    }
}

/// Triton's shared-memory parameters of an input or output (REST reads them from its JSON,
/// gRPC from its parameter map).
#[derive(Deserialize, Default)]
pub struct ShmParameters {
    pub shared_memory_region: Option<String>,
    pub shared_memory_byte_size: Option<u64>,
    pub shared_memory_offset: Option<u64>,
}

/// One requested output as its front end read it.
pub struct OutputDesc {
    pub name: String,
    /// The request asked for Triton's classification extension, which is not supported.
    pub classification: bool,
    pub shm: Result<ShmParameters, ApiError>,
}

/// An output to write into a registered region (`shared_memory_*` output parameters).
#[derive(Debug, Clone)]
pub struct ShmOutput {
    /// The region's name, echoed in the response.
    pub region: String,
    /// `shared_memory_offset` as the client gave it (within the region).
    pub offset: u64,
    pub target: OutputTarget,
}

impl PartialEq for ShmOutput {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.region,
            self.offset,
            &self.target.name,
            self.target.length,
        ) == (
            &other.region,
            other.offset,
            &other.target.name,
            other.target.length,
        )
    }
}

/// Decodes the inputs and outputs of one request.
pub struct Decoder<'r, 'b> {
    pub protocol: Protocol,
    pub regions: &'r Regions,
    /// The request's binary section (REST binary extension), consumed in input order.
    pub binary: Option<&'b mut BinaryData>,
}

impl Decoder<'_, '_> {
    /// One input as an engine tensor.
    pub fn input(&mut self, desc: InputDesc<'_>) -> Result<Tensor, ApiError> {
        let InputDesc {
            name,
            datatype,
            shape,
            shm,
            data,
        } = desc;
        let bad = |msg: String| ApiError::BadRequest(format!("input '{name}': {msg}"));
        let datatype = DataType::parse(&datatype).ok_or_else(|| {
            let known: Vec<&str> = DataType::ALL.iter().map(|d| d.as_str()).collect();
            bad(format!(
                "unknown datatype '{datatype}'; expected one of {}",
                known.join(", ")
            ))
        })?;
        let count = element_count(&shape).ok_or_else(|| {
            bad(format!(
                "shape {shape:?} has a negative dimension or too many elements"
            ))
        })?;
        let shm = shm?;
        let (data, storage) = match &shm.shared_memory_region {
            Some(region) => {
                if data.given() {
                    return Err(bad(self.protocol.shm_and_data().to_string()));
                }
                let slice = shm_input(&name, datatype, &shape, count, region, &shm, self.regions)
                    .map_err(|e| e.into_api(&name))?;
                match datatype {
                    // The engine checks every element of these (`engine::validate`): read
                    // them once, here, and let them travel as the core's own bytes.
                    DataType::Bool | DataType::Bytes => {
                        // Checked before the copy, whose buffer is the size the client named:
                        // a sparse segment of a terabyte costs the client nothing.
                        let limit = self.regions.max_read_bytes();
                        if slice.len > limit {
                            return Err(bad(format!(
                                "names {} bytes of shared memory, more than the largest tensor \
                                 accepted ({limit} bytes, --max-tensor-bytes)",
                                slice.len
                            )));
                        }
                        (
                            read_off_runtime(&slice, &format!("input '{name}'"))?,
                            Storage::Core,
                        )
                    }
                    // The bytes stay in the client's segment: a lone request's worker maps
                    // it, a batch's assembly reads it.
                    _ => (Bytes::new(), Storage::Client(slice)),
                }
            }
            None if shm.shared_memory_byte_size.is_some() || shm.shared_memory_offset.is_some() => {
                return Err(bad(
                    "has shared_memory_byte_size or shared_memory_offset but no shared_memory_region"
                        .to_string(),
                ));
            }
            None => (
                self.data(&name, datatype, &shape, count, data)?,
                Storage::Core,
            ),
        };
        Ok(Tensor {
            name,
            datatype,
            shape,
            data,
            storage,
        })
    }

    /// The bytes of an input not in shared memory.
    fn data(
        &mut self,
        name: &str,
        datatype: DataType,
        shape: &[i64],
        count: usize,
        data: Data<'_>,
    ) -> Result<Bytes, ApiError> {
        let bad = |msg: String| ApiError::BadRequest(format!("input '{name}': {msg}"));
        match data {
            Data::Both => Err(bad(self.protocol.both().to_string())),
            // gRPC: zero elements need no data (clients send none for them).
            Data::Absent if count == 0 && self.protocol == Protocol::Grpc => Ok(Bytes::new()),
            Data::Absent => Err(bad(self.protocol.absent().to_string())),
            Data::Json(raw) => Ok(Bytes::from(
                json_data::decode(raw, datatype, shape, count)
                    .map_err(|e| bad(format!("data: {e}")))?,
            )),
            Data::Binary(size) => {
                let size = usize::try_from(size)
                    .map_err(|_| bad(format!("binary_data_size {size} is too large")))?;
                check_data_size(datatype, shape, count, size, "binary_data_size").map_err(bad)?;
                match self.binary.as_deref_mut() {
                    Some(binary) => binary.take(name, size),
                    None => Err(bad("binary_data_size needs the binary extension".into())),
                }
            }
            Data::Raw(raw) => {
                check_raw_size(datatype, shape, count, raw.len()).map_err(bad)?;
                Ok(raw)
            }
            Data::Typed(c) => Ok(Bytes::from(
                contents::decode(&c, datatype, count).map_err(bad)?,
            )),
        }
    }

    /// Where a requested output goes when the client gave a shared-memory region for it.
    pub fn output(&self, desc: OutputDesc) -> Result<Option<ShmOutput>, ApiError> {
        if desc.classification {
            return Err(ApiError::BadRequest(format!(
                "output '{}': the classification extension is not supported",
                desc.name
            )));
        }
        shm_output(&desc.name, desc.shm?, self.regions)
    }
}

impl Protocol {
    fn shm_and_data(self) -> &'static str {
        match self {
            Protocol::Rest => {
                "has parameters.shared_memory_region and also 'data' or binary_data_size; send one"
            }
            Protocol::Grpc => "has shared_memory_region and also contents; send one",
        }
    }

    fn both(self) -> &'static str {
        match self {
            Protocol::Rest => "has both 'data' and parameters.binary_data_size; send one",
            Protocol::Grpc => "has both contents and raw_input_contents; send one",
        }
    }

    fn absent(self) -> &'static str {
        match self {
            Protocol::Rest => "has neither 'data' nor parameters.binary_data_size",
            Protocol::Grpc => "has no data; send raw_input_contents or contents",
        }
    }
}

/// Where input `name` lives in `region` (`Region::input`), after checking that
/// `shared_memory_byte_size` is given and fits the shape.
fn shm_input(
    name: &str,
    datatype: DataType,
    shape: &[i64],
    count: usize,
    region: &str,
    params: &ShmParameters,
    regions: &Regions,
) -> Result<ClientSlice, ShmInputError> {
    let size = params.shared_memory_byte_size.ok_or_else(|| {
        ShmInputError::Message(
            "parameters.shared_memory_byte_size is required with shared_memory_region".into(),
        )
    })?;
    let len = usize::try_from(size).map_err(|_| {
        ShmInputError::Message(format!("shared_memory_byte_size {size} is too large"))
    })?;
    check_data_size(datatype, shape, count, len, "shared_memory_byte_size")
        .map_err(ShmInputError::Message)?;
    let offset = params.shared_memory_offset.unwrap_or(0);
    Ok(regions
        .get(region)
        .and_then(|r| r.input(&format!("input '{name}'"), offset, size))?)
}

/// Why `shm_input` failed: a message about the input's parameters (prefixed with the
/// input's name), or a region error (which names it already).
enum ShmInputError {
    Message(String),
    Region(RegionError),
}

impl ShmInputError {
    fn into_api(self, input: &str) -> ApiError {
        match self {
            ShmInputError::Message(m) => ApiError::BadRequest(format!("input '{input}': {m}")),
            ShmInputError::Region(e) => e.into(),
        }
    }
}

impl From<RegionError> for ShmInputError {
    fn from(e: RegionError) -> Self {
        ShmInputError::Region(e)
    }
}

/// Fixed-size datatypes must send exactly shape × element size; BYTES can only be checked
/// element by element, which `engine::validate` does.
fn check_data_size(
    datatype: DataType,
    shape: &[i64],
    count: usize,
    size: usize,
    what: &str,
) -> Result<(), String> {
    match expected_size(datatype, shape, count)? {
        Some(expected) if expected != size => Err(format!(
            "{what} is {size} but shape {shape:?} of {datatype} needs {expected} bytes"
        )),
        _ => Ok(()),
    }
}

/// As `check_data_size`, worded for a gRPC raw entry.
fn check_raw_size(
    datatype: DataType,
    shape: &[i64],
    count: usize,
    size: usize,
) -> Result<(), String> {
    match expected_size(datatype, shape, count)? {
        Some(expected) if expected != size => Err(format!(
            "raw_input_contents has {size} bytes but shape {shape:?} of {datatype} needs \
             {expected} bytes"
        )),
        _ => Ok(()),
    }
}

/// Bytes a fixed-size datatype needs for `count` elements; `None` for BYTES.
fn expected_size(datatype: DataType, shape: &[i64], count: usize) -> Result<Option<usize>, String> {
    let Some(elem) = datatype.size() else {
        return Ok(None);
    };
    count
        .checked_mul(elem)
        .map(Some)
        .ok_or_else(|| format!("shape {shape:?} has too many elements"))
}

/// Where output `name` goes when the client gave a shared-memory region for it.
fn shm_output(
    name: &str,
    params: ShmParameters,
    regions: &Regions,
) -> Result<Option<ShmOutput>, ApiError> {
    let Some(region) = params.shared_memory_region else {
        if params.shared_memory_byte_size.is_some() || params.shared_memory_offset.is_some() {
            return Err(ApiError::BadRequest(format!(
                "output '{name}': has shared_memory_byte_size or shared_memory_offset but no shared_memory_region"
            )));
        }
        return Ok(None);
    };
    let size = params
        .shared_memory_byte_size
        .ok_or_else(|| RegionError::BadTensor {
            tensor: format!("output '{name}'"),
            message: "parameters.shared_memory_byte_size is required with shared_memory_region"
                .into(),
        })?;
    let offset = params.shared_memory_offset.unwrap_or(0);
    let target = regions.get(&region)?.output_target(name, offset, size)?;
    Ok(Some(ShmOutput {
        region,
        offset,
        target,
    }))
}

/// Copies `slice` out of its segment (`read_input`): a `pread` of up to
/// `--max-tensor-bytes`, which must not hold a runtime thread, so on the multi-threaded
/// runtime the thread hands its other tasks over while it reads (`block_in_place`); on a
/// current-thread runtime (tests) there is no other thread to hand them to.
fn read_off_runtime(slice: &ClientSlice, tensor: &str) -> Result<Bytes, RegionError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| read_input(slice, tensor)),
        _ => read_input(slice, tensor),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(data: Data<'_>) -> InputDesc<'_> {
        InputDesc {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![2],
            shm: Ok(ShmParameters::default()),
            data,
        }
    }

    fn decode(protocol: Protocol, d: InputDesc<'_>) -> Result<Tensor, String> {
        let regions = Regions::new(false);
        let mut decoder = Decoder {
            protocol,
            regions: &regions,
            binary: None,
        };
        decoder.input(d).map_err(|e| e.to_string())
    }

    #[test]
    fn every_source_gives_the_same_tensor() {
        let bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let json = RawValue::from_string("[1.5, -2]".into()).unwrap();
        let typed = InferTensorContents {
            fp32_contents: vec![1.5, -2.0],
            ..Default::default()
        };
        let from_json = decode(Protocol::Rest, desc(Data::Json(&json))).unwrap();
        let from_raw = decode(Protocol::Grpc, desc(Data::Raw(Bytes::from(bytes.clone())))).unwrap();
        let from_typed = decode(Protocol::Grpc, desc(Data::Typed(typed))).unwrap();
        assert_eq!(from_json.data, bytes);
        assert_eq!(from_json, from_raw);
        assert_eq!(from_raw, from_typed);
    }

    #[test]
    fn missing_and_doubled_data_are_named_in_each_protocol_s_words() {
        assert_eq!(
            decode(Protocol::Rest, desc(Data::Absent)).unwrap_err(),
            "input 'x': has neither 'data' nor parameters.binary_data_size"
        );
        assert_eq!(
            decode(Protocol::Grpc, desc(Data::Absent)).unwrap_err(),
            "input 'x': has no data; send raw_input_contents or contents"
        );
        assert_eq!(
            decode(Protocol::Grpc, desc(Data::Both)).unwrap_err(),
            "input 'x': has both contents and raw_input_contents; send one"
        );
        let empty = InputDesc {
            shape: vec![0],
            ..desc(Data::Absent)
        };
        assert_eq!(decode(Protocol::Grpc, empty).unwrap().data.len(), 0);
    }

    #[test]
    fn shared_memory_excludes_other_data_and_needs_a_region() {
        let region = |data| InputDesc {
            shm: Ok(ShmParameters {
                shared_memory_region: Some("r".into()),
                shared_memory_byte_size: Some(8),
                shared_memory_offset: None,
            }),
            ..desc(data)
        };
        assert_eq!(
            decode(
                Protocol::Grpc,
                region(Data::Raw(Bytes::from_static(&[0; 8])))
            )
            .unwrap_err(),
            "input 'x': has shared_memory_region and also contents; send one"
        );
        assert_eq!(
            decode(Protocol::Rest, region(Data::Absent)).unwrap_err(),
            "unknown shared-memory region 'r'; register it first"
        );
        let offset_only = InputDesc {
            shm: Ok(ShmParameters {
                shared_memory_offset: Some(4),
                ..ShmParameters::default()
            }),
            ..desc(Data::Absent)
        };
        assert!(
            decode(Protocol::Rest, offset_only)
                .unwrap_err()
                .ends_with("but no shared_memory_region")
        );
    }

    /// Inputs in a client's region stay there (a worker maps them), except BOOL and BYTES,
    /// whose elements the engine checks: those are read once, here, as the core's own bytes.
    #[test]
    fn shm_inputs_stay_in_the_segment_unless_their_elements_are_checked() {
        use nix::fcntl::OFlag;
        use nix::sys::stat::Mode;
        let key = format!("/um-test-{}-input", std::process::id());
        let fd = nix::sys::mman::shm_open(
            key.as_str(),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(64).unwrap();
        let element = crate::tensor::bytes_codec::encode([b"hi".as_slice()]);
        std::os::unix::fs::FileExt::write_all_at(&file, &element, 0).unwrap();
        let regions = Regions::new(true);
        regions.register("r", &key, 0, 64).unwrap();
        let _ = nix::sys::mman::shm_unlink(key.as_str());
        let mut decoder = Decoder {
            protocol: Protocol::Rest,
            regions: &regions,
            binary: None,
        };
        let mut input = |datatype: &str, shape: Vec<i64>, size: u64| {
            decoder.input(InputDesc {
                name: "x".into(),
                datatype: datatype.into(),
                shape,
                shm: Ok(ShmParameters {
                    shared_memory_region: Some("r".into()),
                    shared_memory_byte_size: Some(size),
                    shared_memory_offset: None,
                }),
                data: Data::Absent,
            })
        };
        let fp32 = input("FP32", vec![2], 8).unwrap();
        assert!(fp32.data.is_empty());
        assert_eq!(fp32.byte_len(), 8);
        assert!(matches!(&fp32.storage, Storage::Client(s) if s.region == "r" && s.len == 8));
        let bytes = input("BYTES", vec![1], element.len() as u64).unwrap();
        assert_eq!(bytes.data, element);
        assert!(matches!(bytes.storage, Storage::Core));
        // Shrunk since registration: refused when decoded, naming the sizes.
        file.set_len(4).unwrap();
        let err = input("FP32", vec![2], 8).unwrap_err().to_string();
        assert!(
            err.contains("region 'r' is unusable") && err.contains("now 4 bytes"),
            "{err}"
        );
    }
}
