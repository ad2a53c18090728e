//! Server and model metadata and statistics as gRPC messages, built from the same values
//! the REST bodies use (`api/metadata.rs`), so both protocols always say the same.

use super::proto::model_metadata_response::TensorMetadata;
use super::proto::{
    InferBatchStatistics, InferStatistics, ModelMetadataResponse, ModelStatistics,
    ModelStatisticsResponse, ServerMetadataResponse, StatisticDuration,
};
use crate::api::metadata::{ModelMetadata, ServerMetadata};
use crate::engine::{ModelStats, ModelStatus, StatDuration};
use std::collections::HashMap;

pub fn server_metadata(m: ServerMetadata) -> ServerMetadataResponse {
    ServerMetadataResponse {
        name: m.name.to_string(),
        version: m.version.to_string(),
        extensions: m.extensions.iter().map(|e| e.to_string()).collect(),
    }
}

pub fn model_metadata(status: &ModelStatus) -> ModelMetadataResponse {
    let m = ModelMetadata::new(status);
    let tensors = |ts: &[crate::api::metadata::TensorMetadata<'_>]| {
        ts.iter()
            .map(|t| TensorMetadata {
                name: t.name.to_string(),
                datatype: t.datatype.to_string(),
                shape: t.shape.clone(),
            })
            .collect()
    };
    ModelMetadataResponse {
        name: m.name.to_string(),
        versions: m.versions.iter().map(|v| v.to_string()).collect(),
        platform: m.platform.to_string(),
        inputs: tensors(&m.inputs),
        outputs: tensors(&m.outputs),
    }
}

pub fn statistics(stats: &[ModelStats]) -> ModelStatisticsResponse {
    ModelStatisticsResponse {
        model_stats: stats.iter().map(model_statistics).collect(),
    }
}

fn duration(d: StatDuration) -> Option<StatisticDuration> {
    Some(StatisticDuration {
        count: d.count,
        ns: d.ns,
    })
}

fn model_statistics(s: &ModelStats) -> ModelStatistics {
    ModelStatistics {
        name: s.name.clone(),
        version: s.version.clone(),
        last_inference: s.last_inference_ms,
        inference_count: s.inference_count,
        execution_count: s.execution_count,
        inference_stats: Some(InferStatistics {
            success: duration(s.success),
            fail: duration(s.fail),
            queue: duration(s.queue),
            compute_input: duration(s.compute_input),
            compute_infer: duration(s.compute_infer),
            compute_output: duration(s.compute_output),
            // No response cache: nothing is ever a hit or a miss.
            cache_hit: duration(StatDuration::default()),
            cache_miss: duration(StatDuration::default()),
        }),
        batch_stats: s
            .batch_stats
            .iter()
            .map(|b| InferBatchStatistics {
                batch_size: b.batch_size,
                compute_input: duration(b.compute_input),
                compute_infer: duration(b.compute_infer),
                compute_output: duration(b.compute_output),
            })
            .collect(),
        memory_usage: vec![],
        response_stats: HashMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::BatchStat;

    #[test]
    fn statistics_carry_every_count() {
        let d = |count, ns| StatDuration { count, ns };
        let s = ModelStats {
            name: "m".into(),
            version: "1".into(),
            last_inference_ms: 42,
            inference_count: 9,
            execution_count: 3,
            success: d(5, 500),
            fail: d(1, 10),
            queue: d(5, 50),
            compute_input: d(3, 30),
            compute_infer: d(3, 300),
            compute_output: d(3, 33),
            batch_stats: vec![BatchStat {
                batch_size: 4,
                compute_input: d(2, 20),
                compute_infer: d(2, 200),
                compute_output: d(2, 22),
            }],
        };
        let r = statistics(std::slice::from_ref(&s));
        let m = &r.model_stats[0];
        assert_eq!((m.name.as_str(), m.version.as_str()), ("m", "1"));
        assert_eq!(
            (m.last_inference, m.inference_count, m.execution_count),
            (42, 9, 3)
        );
        let i = m.inference_stats.as_ref().unwrap();
        assert_eq!(i.success, duration(d(5, 500)));
        assert_eq!(i.fail, duration(d(1, 10)));
        assert_eq!(i.queue, duration(d(5, 50)));
        assert_eq!(i.compute_infer, duration(d(3, 300)));
        assert_eq!(m.batch_stats[0].batch_size, 4);
        assert_eq!(m.batch_stats[0].compute_output, duration(d(2, 22)));
    }
}
