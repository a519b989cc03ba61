"""SecAgg+ on the server: the four stages of Flower's SecAggPlusWorkflow, driven from fl-sim's
round (docs/privacy.md).

Flower's workflow is written for its legacy strategies: it asks a LegacyContext's strategy to
`configure_fit`, and hands the unmasked sum to its `aggregate_fit`. Here the stages run one by
one with a stand-in for that strategy (`_Handover`), which takes the nodes of the round's
sample and gives back the sum; the third stage sends fl-sim's own train messages (the
strategy's, as a plain round sends them). The workflow's grid (`_StageGrid`) exchanges as
fl-sim does (bounded by round_timeout_s, stoppable, packed through a SuperLink) and vets every
reply: a malformed one, or a masked update of other names or shapes, counts as a client that
dropped out, and the protocol removes its masks.

What reaches aggregation: each surviving client's reply carries the unmasked mean in place
of its own update, as Flower's workflow does for legacy strategies. So FedAvg, FedProx,
FedBN, the FedOpt family, SCAFFOLD (its Δc summed the same way) and client-side DP aggregate
as in a plain round (the weighted mean of identical arrays is those arrays), and what they
count per reply (SCAFFOLD's |S|, DP's sampled clients, adaptive clipping's bits) stays right.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from fl_sim.adversary import SAT_OUT
from fl_sim.arrays import layout, to_state_dict
from fl_sim.config import SecureAggregationConfig
from fl_sim.errors import FlSimError
from fl_sim.server.messaging import node_name
from fl_sim.server.vetting import masked_layout, masked_refusal, reply_layout

log = logging.getLogger(__name__)

SAT_OUT_REASON = "sat the round out (availability)"


@dataclass
class _Node:
    """All of a ClientProxy that Flower's workflow reads."""

    node_id: int


class _Handover:
    """The legacy strategy (and client manager) Flower's workflow talks to: it samples the
    round's nodes and keeps the unmasked sum (divided by the total weight: the mean)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes, self.mean = nodes, None

    def num_available(self) -> int:
        return len(self.nodes)

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Node(n), FitIns(parameters, {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            return None, {}
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}


class _StageGrid:
    """The grid as Flower's workflow sees it: fl-sim's exchange, each reply vetted; a refused
    one becomes an error reply, which the workflow counts as a client that dropped out."""

    def __init__(self, relay: Callable[[list[Message]], list[Message]],
                 vet_masked: Callable[[Message, Message], str | None]) -> None:
        self.relay, self.vet_masked = relay, vet_masked
        self.reasons: dict[int, str] = {}  # why each missing node is missing
        self.masked: dict[int, Message] = {}  # the collect stage's accepted replies

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        if not messages:
            return []
        stage = messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        pulled = self.relay(messages)
        sent = {m.metadata.message_id: m for m in messages}  # ids given on sending
        replies, answered = [], set()
        for reply in pulled:
            to = sent[reply.metadata.reply_to_message_id]
            node = to.metadata.dst_node_id
            answered.add(node)
            why = reply.error.reason.strip() if reply.has_error() else self._refusal(stage, reply,
                                                                                      to)
            if why is None:
                replies.append(reply)
                if stage == Stage.COLLECT_MASKED_VECTORS:
                    self.masked[node] = reply
                continue
            self.reasons[node] = why if why == SAT_OUT_REASON else f"{stage} stage: {why}"
            replies.append(Message(Error(code=0, reason=why), metadata=reply.metadata))
        for node in {m.metadata.dst_node_id for m in messages} - answered:
            self.reasons[node] = f"{stage} stage: no reply within round_timeout_s"
        return replies

    def _refusal(self, stage: str, reply: Message, sent: Message) -> str | None:
        if stage == Stage.COLLECT_MASKED_VECTORS:
            if SAT_OUT in reply.content.get("metrics", {}):
                return SAT_OUT_REASON
            try:  # the workflow reads Flower's legacy FitRes records of it
                compat.recorddict_to_fitres(reply.content, keep_input=True)
            except (KeyError, TypeError, ValueError):
                return "its reply lacks Flower's FitRes records"
            return self.vet_masked(reply, sent)
        record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        needed = {Stage.SETUP: {Key.PUBLIC_KEY_1: bytes, Key.PUBLIC_KEY_2: bytes},
                  Stage.SHARE_KEYS: {Key.DESTINATION_LIST: int, Key.CIPHERTEXT_LIST: bytes},
                  Stage.UNMASK: {Key.NODE_ID_LIST: int, Key.SHARE_LIST: bytes}}[stage]
        if record is None or set(record) != set(needed):
            return f"its reply lacks the protocol's {sorted(needed)}"
        if stage == Stage.SETUP:
            ok = all(isinstance(record[k], bytes) for k in needed)
        else:
            lists = [record[k] for k in needed]
            ok = (all(isinstance(v, list) for v in lists) and len(lists[0]) == len(lists[1])
                  and all(isinstance(x, kind) for v, kind in zip(lists, needed.values(),
                                                                 strict=True) for x in v))
        return None if ok else f"its reply's {sorted(needed)} are malformed"


class SecureAggregation:
    """A round's training through SecAgg+: the train messages in, each surviving client's
    reply (its metrics, and the mean update applied to the sent arrays) out."""

    def __init__(self, cfg: SecureAggregationConfig, max_weight: float, weight_key: str) -> None:
        self.cfg, self.max_weight, self.weight_key = cfg, max_weight, weight_key
        self.workflow = SecAggPlusWorkflow(
            cfg.num_shares, cfg.threshold, max_weight=max_weight,
            clipping_range=cfg.clipping_range, quantization_range=cfg.quantization_range,
            modulus_range=cfg.modulus_range)

    def train(self, messages: list[Message], relay: Callable[[list[Message]], list[Message]],
              server_round: int, min_replies: int, names: dict[int, int]) -> list[Message]:
        """`relay`: one bounded exchange with the clients. `names`: node -> partition id,
        where known, for the messages. Stops the run (FlSimError) where too few remain."""
        handover = _Handover([m.metadata.dst_node_id for m in messages])
        context = LegacyContext(Context(
            run_id=0, node_id=0, node_config={}, run_config={},
            state=RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND:
                                                                 server_round}),
                              MAIN_PARAMS_RECORD: ArrayRecord()})),
            strategy=handover, client_manager=handover)
        grid = _StageGrid(relay, lambda reply, sent: masked_refusal(
            reply, sent, self.weight_key, self.max_weight))
        state = WorkflowState()
        stages = {Stage.SETUP: self.workflow.setup_stage,
                  Stage.SHARE_KEYS: self.workflow.share_keys_stage,
                  Stage.COLLECT_MASKED_VECTORS: self.workflow.collect_masked_vectors_stage,
                  Stage.UNMASK: self.workflow.unmask_stage}
        for stage, run_stage in stages.items():
            if not run_stage(grid, context, state):
                raise FlSimError(self._failure(stage, state, grid, server_round, names))
            if stage == Stage.SETUP:  # the third stage sends fl-sim's train messages
                state.nid_to_fitins = {m.metadata.dst_node_id: RecordDict(dict(m.content))
                                       for m in messages}
        replies = sorted(grid.masked.values(), key=lambda m: m.content["metrics"]["partition-id"])
        if len(replies) < min_replies:
            raise FlSimError(
                f"round {server_round} (train, secure aggregation): {len(replies)} of "
                f"{len(messages)} clients sent their masked update, {min_replies} needed "
                f"(min_clients). {self._missing(grid, names)}. The rounds finished before are "
                "kept.")
        self._log_missing(grid, server_round, names)
        mean = self._applied(messages[0].content["arrays"], handover.mean)
        for reply in replies:
            reply.content = RecordDict({"arrays": mean, "metrics": reply.content["metrics"]})
        return replies

    def _applied(self, sent: ArrayRecord, mean_update: list[np.ndarray]) -> ArrayRecord:
        """The sent arrays moved by the mean update (SCAFFOLD's c: the mean Δc); integer
        arrays as sent (clients mask none)."""
        state = to_state_dict(sent)
        expected = reply_layout(layout(sent))
        update = dict(zip(masked_layout(sent), mean_update, strict=True))
        out = OrderedDict()
        for (name, (dtype, _)), sent_name in zip(expected.items(), state, strict=True):
            base = state[sent_name].numpy()
            if name not in update:
                out[name] = Array(np.array(base))
            elif name == sent_name:
                out[name] = Array((base.astype(np.float64) + update[name]).astype(dtype))
            else:  # Δc answers c
                out[name] = Array(update[name].astype(dtype))
        return ArrayRecord(out)

    def _failure(self, stage: str, state: WorkflowState, grid: _StageGrid, server_round: int,
                 names: dict[int, int]) -> str:
        remain, sampled = len(state.active_node_ids), len(state.sampled_node_ids)
        return (f"round {server_round} (train, secure aggregation): after the {stage} stage "
                f"{remain} of {sampled} sampled clients remain, and SecAgg+ needs "
                f"{state.threshold} of the {state.num_shares} holders of each client's shares "
                f"(secure_aggregation.threshold, num_shares) to go on. "
                f"{self._missing(grid, names)}. The rounds finished before are kept.")

    @staticmethod
    def _missing(grid: _StageGrid, names: dict[int, int]) -> str:
        return "Missing: " + ("; ".join(f"{node_name(n, names)}: {why}"
                                        for n, why in grid.reasons.items()) or "none")

    @staticmethod
    def _log_missing(grid: _StageGrid, server_round: int, names: dict[int, int]) -> None:
        sat_out = [n for n, why in grid.reasons.items() if why == SAT_OUT_REASON]
        if sat_out:
            log.info("round %d (secure aggregation): %d clients sat out (availability); the "
                     "others' shares removed their masks", server_round, len(sat_out))
        for node, why in grid.reasons.items():
            if why != SAT_OUT_REASON:
                log.warning("round %d (secure aggregation): continuing without %s: %s",
                            server_round, node_name(node, names), why)
