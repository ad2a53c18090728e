//! The actor's steps: starting one per instance, applying its samples (policy, text,
//! responses), and what a failed step or a lost worker ends.

use super::*;

impl ContinuousBatcher {
    /// Starts a step on every usable instance with work and none in flight.
    pub(super) fn start_steps(&mut self) {
        for (idx, inst) in self.instances.iter_mut().enumerate() {
            if inst.stepping.is_some() || inst.state != InstanceState::Ready {
                continue;
            }
            let Some(policy) = inst.policy.as_mut() else {
                continue;
            };
            if policy.is_idle() {
                continue;
            }
            let plan = match policy.plan() {
                Ok(plan) => plan,
                Err(e) => {
                    tracing::error!(model = %self.config.name, instance = idx, "planning a step: {e}");
                    continue;
                }
            };
            if plan.seqs.is_empty() && plan.release.is_empty() {
                continue;
            }
            let now = Instant::now();
            let metrics = self.stats.metrics().llm();
            for s in &plan.seqs {
                if let Some(live) = self.live.get_mut(&s.seq_id)
                    && live.scheduled(now)
                {
                    metrics.started(live.queue_time(), live.stream.usage().prompt_tokens);
                }
            }
            let live = &self.live;
            let work = step_io::encode(&plan, |id| live.get(&id).map_or(GREEDY, |l| l.sampling));
            let call = inst.exec.execute(work);
            let generation = inst.generation;
            self.steps.push(Box::pin(async move {
                let started = Instant::now();
                let result = call.await;
                StepDone {
                    idx,
                    generation,
                    result,
                    call: started.elapsed(),
                }
            }));
            inst.stepping = Some(plan);
        }
    }

    pub(super) fn on_step(&mut self, done: StepDone) {
        self.step_done(done);
    }

    /// The scheduler gauges (summed over instances) and the preemptions since last time.
    /// Waiting counts requests not yet placed on an instance too (none ready, say).
    pub(super) fn record_scheduler(&mut self) {
        let (mut running, mut used, mut total, mut preempted) = (0, 0, 0, 0);
        let mut waiting = self.pending.len();
        for inst in &mut self.instances {
            let Some(policy) = &inst.policy else {
                continue;
            };
            let c = policy.counters();
            running += c.running;
            waiting += c.waiting;
            used += c.kv_used;
            total += c.kv_total;
            preempted += c.preemptions.saturating_sub(inst.preemptions_seen);
            inst.preemptions_seen = c.preemptions;
        }
        let usage = if total == 0 {
            0.0
        } else {
            used as f64 / total as f64
        };
        self.stats
            .metrics()
            .llm()
            .scheduler(running, waiting, usage, preempted);
    }

    pub(super) fn step_done(&mut self, done: StepDone) {
        let Some(inst) = self.instances.get_mut(done.idx) else {
            return;
        };
        if inst.generation != done.generation {
            return;
        }
        let Some(plan) = inst.stepping.take() else {
            return;
        };
        let model = self.model();
        match done.result {
            Ok(out) => {
                if plan.seqs.is_empty() {
                    return; // Only released sequences: nothing to complete.
                }
                let infer = Duration::from_nanos(out.compute_ns);
                self.stats.record_batch(BatchTimes {
                    rows: plan.seqs.len() as u32,
                    input: Duration::ZERO,
                    infer,
                    output: done.call.saturating_sub(infer),
                    call: done.call,
                });
                match step_io::decode(&plan, &out) {
                    Ok(samples) => self.complete_step(done.idx, &plan, &samples),
                    Err(message) => {
                        self.fail_step(done.idx, &plan, EngineError::BadOutput { model, message })
                    }
                }
            }
            Err(WorkerError::Plugin { message, .. }) => {
                self.fail_step(done.idx, &plan, EngineError::Plugin { model, message })
            }
            Err(e) => {
                self.instance_lost(done.idx, &e.to_string());
                let replaced = matches!(
                    e,
                    WorkerError::Crashed { .. }
                        | WorkerError::ExecutionTimeout { .. }
                        | WorkerError::Protocol(_)
                );
                let inst = &mut self.instances[done.idx];
                if replaced {
                    // The worker is gone or being replaced. The crash is reported here before
                    // the supervisor publishes the restart: with no policy the instance takes
                    // no requests meanwhile (they wait for one that serves), and its next
                    // Ready makes a fresh policy (`on_instance_state`).
                    inst.policy = None;
                } else if let Text::Ready(text) = &inst.text {
                    // The same worker serves on, with none of the failed sequences.
                    let text = text.clone();
                    self.text_ready(done.idx, text);
                }
            }
        }
    }

    /// A step's samples: the policy first, then each sequence's text and response.
    pub(super) fn complete_step(
        &mut self,
        idx: usize,
        plan: &StepPlan,
        samples: &[step_io::Sample],
    ) {
        let pairs: Vec<(u64, u32)> = samples.iter().map(|s| (s.seq_id, s.token)).collect();
        let inst = &mut self.instances[idx];
        let Some(policy) = inst.policy.as_mut() else {
            return;
        };
        let outcome = match policy.complete(&pairs) {
            Ok(outcome) => outcome,
            Err(e) => {
                let message = format!("the step's samples do not match it: {e}");
                let model = self.model();
                return self.fail_step(idx, plan, EngineError::BadOutput { model, message });
            }
        };
        let batch = plan.seqs.len() as u32;
        let metrics = self.stats.metrics().llm();
        let now = Instant::now();
        for s in samples {
            let Some(live) = self.live.get_mut(&s.seq_id) else {
                continue;
            };
            let (first, since) = live.token_at(now);
            metrics.token(first, since);
            live.note_logprobs(s.token, s.logprob, &s.top);
            let text = live.text.clone();
            match live.stream.push(&text.tok, s.token) {
                Ok(delta) => match delta.finish {
                    None if delta.text.is_empty() => {}
                    None => live.respond(&delta.text, "", batch),
                    Some(finish) => {
                        policy.finish(s.seq_id, reason_of(&finish));
                        if let Some(mut live) = self.live.remove(&s.seq_id) {
                            inst.load = inst.load.saturating_sub(1);
                            live.respond(&delta.text, finish.reason(), batch);
                            end(&self.stats, live, Ok(()));
                        }
                    }
                },
                Err(e) => {
                    policy.cancel(s.seq_id);
                    if let Some(live) = self.live.remove(&s.seq_id) {
                        inst.load = inst.load.saturating_sub(1);
                        let err = EngineError::Internal(format!("detokenizing failed: {e}"));
                        end(&self.stats, live, Err(err));
                    }
                }
            }
        }
        // Ended by the policy (its stop ids, max_tokens, the context) but not by the text
        // stream: should not happen (same limits), but the request must still end.
        for (seq_id, reason) in outcome.finished {
            if let Some(mut live) = self.live.remove(&seq_id) {
                inst.load = inst.load.saturating_sub(1);
                live.respond("", reason.as_str(), batch);
                end(&self.stats, live, Ok(()));
            }
        }
    }

    /// The plugin failed this step: its sequences end with `err`, the others go on.
    pub(super) fn fail_step(&mut self, idx: usize, plan: &StepPlan, err: EngineError) {
        let inst = &mut self.instances[idx];
        if let Some(policy) = inst.policy.as_mut() {
            for s in &plan.seqs {
                policy.cancel(s.seq_id);
            }
            // Closes the step: every sequence in it is gone, so no sample is missing.
            let _ = policy.complete(&[]);
        }
        for s in &plan.seqs {
            if let Some(live) = self.live.remove(&s.seq_id) {
                inst.load = inst.load.saturating_sub(1);
                end(&self.stats, live, Err(err.clone()));
            }
        }
    }

    /// The instance's worker is gone (crashed, hung, restarting, stopped): every sequence
    /// on it ends with `WorkerFailed`, and its step in flight is forgotten.
    pub(super) fn instance_lost(&mut self, idx: usize, reason: &str) {
        let model = self.model();
        let inst = &mut self.instances[idx];
        inst.generation += 1;
        inst.stepping = None;
        inst.load = 0;
        let ids: Vec<u64> = self
            .live
            .iter()
            .filter(|(_, l)| l.instance == idx)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            if let Some(live) = self.live.remove(&id) {
                let err = EngineError::WorkerFailed {
                    model: model.clone(),
                    reason: format!("{reason}; the generation was stopped"),
                };
                end(&self.stats, live, Err(err));
            }
        }
    }
}
