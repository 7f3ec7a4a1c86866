/**
 * The parts of Kubernetes API objects the stand-in API server reads and writes, with the JSON
 * field names of the real API (v1.31). Fields the stand-in does not look at pass through as
 * clients sent them.
 */

export interface OwnerReference {
  apiVersion: string;
  kind: string;
  name: string;
  uid: string;
  controller?: boolean;
  blockOwnerDeletion?: boolean;
}

export interface ObjectMeta {
  name?: string;
  generateName?: string;
  namespace?: string;
  uid?: string;
  resourceVersion?: string;
  generation?: number;
  creationTimestamp?: string;
  deletionTimestamp?: string;
  deletionGracePeriodSeconds?: number;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
  ownerReferences?: OwnerReference[];
  finalizers?: string[];
}

export interface KubeObject {
  apiVersion: string;
  kind: string;
  metadata: ObjectMeta;
}

export interface LabelSelectorRequirement {
  key: string;
  operator: string;
  values?: string[];
}

export interface LabelSelector {
  matchLabels?: Record<string, string>;
  matchExpressions?: LabelSelectorRequirement[];
}

export interface ContainerPort {
  containerPort: number;
  name?: string;
  protocol?: string;
}

export interface Container {
  name: string;
  image: string;
  command?: string[];
  args?: string[];
  env?: { name: string; value?: string }[];
  ports?: ContainerPort[];
  workingDir?: string;
  imagePullPolicy?: string;
  securityContext?: unknown;
  resources?: unknown;
  terminationMessagePath?: string;
  terminationMessagePolicy?: string;
}

export interface NodeSelectorRequirement {
  key: string;
  operator: string;
  values?: string[];
}

export interface NodeSelectorTerm {
  matchExpressions?: NodeSelectorRequirement[];
  matchFields?: NodeSelectorRequirement[];
}

export interface Affinity {
  nodeAffinity?: {
    requiredDuringSchedulingIgnoredDuringExecution?: { nodeSelectorTerms: NodeSelectorTerm[] };
  };
}

export interface PodSpec {
  containers: Container[];
  restartPolicy?: 'Always' | 'OnFailure' | 'Never';
  nodeName?: string;
  nodeSelector?: Record<string, string>;
  affinity?: Affinity;
  tolerations?: unknown[];
  hostPID?: boolean;
  hostNetwork?: boolean;
  terminationGracePeriodSeconds?: number;
  activeDeadlineSeconds?: number;
  imagePullSecrets?: { name: string }[];
  serviceAccountName?: string;
  dnsPolicy?: string;
  schedulerName?: string;
  hostname?: string;
  subdomain?: string;
}

export interface ContainerState {
  waiting?: { reason: string; message?: string };
  running?: { startedAt: string };
  terminated?: {
    exitCode: number;
    signal?: number;
    reason: string;
    message?: string;
    startedAt?: string;
    finishedAt: string;
    containerID?: string;
  };
}

export interface ContainerStatus {
  name: string;
  image: string;
  imageID: string;
  containerID?: string;
  ready: boolean;
  started: boolean;
  restartCount: number;
  state: ContainerState;
  lastState: ContainerState;
}

export type ConditionStatus = 'True' | 'False' | 'Unknown';

export interface Condition {
  type: string;
  status: ConditionStatus;
  reason?: string;
  message?: string;
  lastTransitionTime: string;
  lastProbeTime?: string | null;
}

export type PodPhase = 'Pending' | 'Running' | 'Succeeded' | 'Failed';

export interface PodStatus {
  phase: PodPhase;
  conditions?: Condition[];
  hostIP?: string;
  hostIPs?: { ip: string }[];
  podIP?: string;
  podIPs?: { ip: string }[];
  startTime?: string;
  containerStatuses?: ContainerStatus[];
  qosClass?: string;
  reason?: string;
  message?: string;
}

export interface Pod extends KubeObject {
  spec: PodSpec;
  status: PodStatus;
}

export interface PodTemplateSpec {
  metadata?: ObjectMeta;
  spec: PodSpec;
}

export interface JobSpec {
  template: PodTemplateSpec;
  backoffLimit?: number;
  completions?: number;
  parallelism?: number;
  activeDeadlineSeconds?: number;
  ttlSecondsAfterFinished?: number;
  selector?: LabelSelector;
  manualSelector?: boolean;
  suspend?: boolean;
  completionMode?: string;
}

export interface JobStatus {
  active?: number;
  succeeded?: number;
  failed?: number;
  ready?: number;
  terminating?: number;
  startTime?: string;
  completionTime?: string;
  conditions?: Condition[];
}

export interface Job extends KubeObject {
  spec: JobSpec;
  status: JobStatus;
}

export interface WorkloadSpec {
  replicas: number;
  selector: LabelSelector;
  template: PodTemplateSpec;
  serviceName?: string;
}

export interface WorkloadStatus {
  replicas: number;
  readyReplicas: number;
  availableReplicas: number;
  updatedReplicas?: number;
  currentReplicas?: number;
  observedGeneration?: number;
  conditions?: Condition[];
}

/** A Deployment, ReplicaSet or StatefulSet. */
export interface Workload extends KubeObject {
  spec: WorkloadSpec;
  status: WorkloadStatus;
}

/** The resources the stand-in serves, as their REST paths name them. */
export interface ResourceType {
  plural: ResourceName;
  kind: string;
  group: string;
  version: string;
  namespaced: boolean;
}

export type ResourceName =
  'pods' | 'namespaces' | 'nodes' | 'jobs' | 'deployments' | 'replicasets' | 'statefulsets';

export const RESOURCES: Record<ResourceName, ResourceType> = {
  pods: { plural: 'pods', kind: 'Pod', group: '', version: 'v1', namespaced: true },
  namespaces: {
    plural: 'namespaces',
    kind: 'Namespace',
    group: '',
    version: 'v1',
    namespaced: false,
  },
  nodes: { plural: 'nodes', kind: 'Node', group: '', version: 'v1', namespaced: false },
  jobs: { plural: 'jobs', kind: 'Job', group: 'batch', version: 'v1', namespaced: true },
  deployments: {
    plural: 'deployments',
    kind: 'Deployment',
    group: 'apps',
    version: 'v1',
    namespaced: true,
  },
  replicasets: {
    plural: 'replicasets',
    kind: 'ReplicaSet',
    group: 'apps',
    version: 'v1',
    namespaced: true,
  },
  statefulsets: {
    plural: 'statefulsets',
    kind: 'StatefulSet',
    group: 'apps',
    version: 'v1',
    namespaced: true,
  },
};

export function apiVersionOf(resource: ResourceType): string {
  return resource.group ? `${resource.group}/${resource.version}` : resource.version;
}

/** `jobs.batch`, `pods`: how the real API server names a resource in its messages. */
export function qualifiedName(resource: ResourceType): string {
  return resource.group ? `${resource.plural}.${resource.group}` : resource.plural;
}

/** RFC 3339 with seconds, as the API server writes timestamps. */
export function timestamp(at = new Date()): string {
  return at.toISOString().replace(/\.\d+Z$/, 'Z');
}

export function ownerReferenceTo(owner: KubeObject): OwnerReference {
  return {
    apiVersion: owner.apiVersion,
    kind: owner.kind,
    name: owner.metadata.name ?? '',
    uid: owner.metadata.uid ?? '',
    controller: true,
    blockOwnerDeletion: true,
  };
}

const SUFFIX_ALPHABET = 'bcdfghjklmnpqrstvwxz2456789';

/** The 5-character random suffix controllers and generateName append (no vowels, as upstream). */
export function randomSuffix(length = 5): string {
  let suffix = '';
  for (let i = 0; i < length; i += 1) {
    suffix += SUFFIX_ALPHABET[Math.floor(Math.random() * SUFFIX_ALPHABET.length)];
  }
  return suffix;
}

/** Sets or replaces the condition of `type`, keeping its transition time if the status holds. */
export function setCondition(
  conditions: Condition[],
  condition: Omit<Condition, 'lastTransitionTime'>,
): Condition[] {
  const previous = conditions.find((c) => c.type === condition.type);
  const lastTransitionTime =
    previous && previous.status === condition.status ? previous.lastTransitionTime : timestamp();
  const next = { ...condition, lastTransitionTime };
  return previous
    ? conditions.map((c) => (c.type === condition.type ? next : c))
    : [...conditions, next];
}
