import type { FaultState } from './faults.js';
import type { ObjectStore } from './store.js';
import { setCondition, type KubeObject, type NodeSelectorRequirement, type Pod } from './types.js';

/**
 * The scheduler of a one-node cluster: binds each new pod to the node when its nodeSelector and
 * required node affinity allow it (as the DaemonSet controller and mirrord pin pods, with
 * matchFields metadata.name), else leaves it Pending with PodScheduled False, reason
 * Unschedulable and the real scheduler's message. Taints: the node has none, so tolerations
 * never matter.
 */

export interface SchedulerNode {
  name: string;
  labels: Record<string, string>;
}

const AFFINITY_MISMATCH =
  "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.";
const NODE_FULL =
  '0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.';

function requirementMatches(
  requirement: NodeSelectorRequirement,
  value: string | undefined,
): boolean {
  const values = requirement.values ?? [];
  switch (requirement.operator) {
    case 'In':
      return value !== undefined && values.includes(value);
    case 'NotIn':
      return value === undefined || !values.includes(value);
    case 'Exists':
      return value !== undefined;
    case 'DoesNotExist':
      return value === undefined;
    case 'Gt':
    case 'Lt': {
      const bound = Number(values[0]);
      const own = Number(value);
      if (value === undefined || Number.isNaN(own) || Number.isNaN(bound)) return false;
      return requirement.operator === 'Gt' ? own > bound : own < bound;
    }
    default:
      return false;
  }
}

/** Whether the pod's nodeSelector and required node affinity admit `node`. */
export function podFitsNode(pod: Pod, node: SchedulerNode): boolean {
  for (const [key, value] of Object.entries(pod.spec.nodeSelector ?? {})) {
    if (node.labels[key] !== value) return false;
  }
  const terms =
    pod.spec.affinity?.nodeAffinity?.requiredDuringSchedulingIgnoredDuringExecution
      ?.nodeSelectorTerms;
  if (!terms) return true;
  // Terms are ORed; within a term every expression and field must match.
  return terms.some(
    (term) =>
      (term.matchExpressions?.length || term.matchFields?.length) &&
      (term.matchExpressions ?? []).every((r) => requirementMatches(r, node.labels[r.key])) &&
      (term.matchFields ?? []).every((r) =>
        requirementMatches(r, r.key === 'metadata.name' ? node.name : undefined),
      ),
  );
}

export class Scheduler {
  readonly #unsubscribe: () => void;

  constructor(
    private readonly store: ObjectStore,
    private readonly node: SchedulerNode,
    private readonly faults: FaultState,
  ) {
    this.#unsubscribe = store.subscribe((event) => {
      if (event.resource === 'pods' && event.type === 'ADDED') this.#schedule(event.object);
    });
    faults.on('changed', this.#retry);
  }

  close(): void {
    this.#unsubscribe();
    this.faults.off('changed', this.#retry);
  }

  /** Pods left unschedulable get another chance whenever a fault changes. */
  readonly #retry = (): void => {
    for (const pod of this.store.list<Pod>('pods')) {
      if (!pod.spec.nodeName && !pod.metadata.deletionTimestamp) this.#schedule(pod);
    }
  };

  #schedule(object: KubeObject): void {
    const pod = object as Pod;
    if (pod.spec.nodeName) return;
    const fits = podFitsNode(pod, this.node);
    const message = !fits ? AFFINITY_MISMATCH : this.faults.isUnschedulable ? NODE_FULL : '';
    this.store.update<Pod>('pods', pod.metadata.namespace, pod.metadata.name ?? '', (p) => {
      if (p.spec.nodeName) return;
      const conditions = p.status.conditions ?? [];
      if (message) {
        p.status.conditions = setCondition(conditions, {
          type: 'PodScheduled',
          status: 'False',
          reason: 'Unschedulable',
          message,
          lastProbeTime: null,
        });
        return;
      }
      p.spec.nodeName = this.node.name;
      p.status.conditions = setCondition(conditions, {
        type: 'PodScheduled',
        status: 'True',
        lastProbeTime: null,
      });
    });
  }
}
