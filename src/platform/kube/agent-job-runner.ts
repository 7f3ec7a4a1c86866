import { Watch, type V1Job, type V1Pod } from '@kubernetes/client-node';
import { agentErrorOf, readinessOf, type AgentReadiness } from '../../protocol/agent-launch.js';
import { apiCall, kubeApiError, statusCodeOf } from './api-errors.js';
import { AGENT_CONTAINER, LABELS, agentSecretManifest } from './agent-job.js';
import { KubeError, type KubeAccess } from './kubeconfig.js';
import { followPodLog, podLogTail, type LogSource } from './pod-log.js';

export interface AgentJobStart {
  access: KubeAccess;
  /** The manifest (see agent-job.ts). */
  job: V1Job;
  /** The session secret, handed to the agent in a Secret its Job owns (agentSecretManifest). */
  secret: string;
  startupTimeoutMs: number;
  progress(note: string): void;
  /** Aborting it (Ctrl-C) stops the wait; what was created is deleted. */
  signal?: AbortSignal;
}

export interface RunningAgentJob {
  namespace: string;
  job: string;
  pod: string;
  readiness: AgentReadiness;
  /**
   * Deletes the Job and, through propagation Background, its pod and Secret; safe to call more
   * than once.
   */
  remove(): Promise<void>;
}

/** Waiting reasons after which the kubelet will not start the agent without someone's help. */
const IMAGE_PULL_FAILURES = new Set([
  'ErrImagePull',
  'ImagePullBackOff',
  'InvalidImageName',
  'ErrImageNeverPull',
  'RegistryUnavailable',
]);
const CONTAINER_START_FAILURES = new Set([
  'CreateContainerConfigError',
  'CreateContainerError',
  'RunContainerError',
]);
const LOG_LINES_KEPT = 20;

/** The deletion of one Job, done once however often it is asked for. */
function jobRemover(access: KubeAccess, namespace: string, name: string): () => Promise<void> {
  let removed: Promise<void> | undefined;
  const remove = async (): Promise<void> => {
    try {
      await access.batch.deleteNamespacedJob({ name, namespace, propagationPolicy: 'Background' });
    } catch (error) {
      if (statusCodeOf(error) === 404) return;
      const reason = kubeApiError(
        error,
        { verb: 'delete', resource: 'jobs.batch', namespace, name },
        access,
      );
      throw new KubeError(
        `could not delete the agent Job ${namespace}/${name} (${reason.message}); the agent exits by itself within its idle timeout and Kubernetes removes the Job after its TTL, or run mirrord cleanup`,
      );
    }
  };
  return () => {
    // A failed deletion may be tried again; a done one is not repeated.
    removed ??= remove().catch((error: unknown) => {
      removed = undefined;
      throw error;
    });
    return removed;
  };
}

/** The agent's own one-line error if it printed one, else its last few lines. */
function exitReason(lines: string[], fallback: string): string {
  const own = agentErrorOf(lines);
  if (own) return own;
  const last = lines.slice(-3).map((line) => line.trim());
  return last.length > 0 ? `its last log lines: ${last.join(' | ')}` : fallback;
}

const delay = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Follows the agent's pod from creation to its readiness line, reporting progress, and fails
 * fast with one line as soon as the pod shows it will not get there.
 */
class AgentStartup {
  private settled = false;
  /** The pod ended; its log is being read for the reason, and nothing else is reported. */
  private ending = false;
  private podName: string | undefined;
  private state = 'no agent pod yet';
  private noted = new Set<string>();
  private following = false;
  private recentLines: string[] = [];
  private resolve!: (value: { pod: string; readiness: AgentReadiness }) => void;
  private reject!: (error: Error) => void;
  readonly done: Promise<{ pod: string; readiness: AgentReadiness }>;

  constructor(
    private readonly access: KubeAccess,
    private readonly namespace: string,
    private readonly image: string,
    private readonly progress: (note: string) => void,
    /** Ends the watches and log streams once the startup is settled. */
    private readonly streams: AbortController,
  ) {
    this.done = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    // It may fail (an interrupt) before anyone awaits it; the failure is read later.
    this.done.catch(() => undefined);
  }

  /** Whether the Job controller made the agent's pod (a watch reported it). */
  get hasPod(): boolean {
    return this.podName !== undefined;
  }

  /**
   * The Job controller could not create the agent's pod (a FailedCreate event): nothing else
   * would say so before the startup timeout.
   */
  failCreate(message: string): void {
    const refusal = /violates PodSecurity "([^"]+)"/.exec(message);
    this.fail(
      new KubeError(
        refusal
          ? `the namespace's Pod Security admission (${refusal[1]}) refuses the agent's pod, which needs hostPID and BPF, NET_ADMIN, SYS_ADMIN, SYS_PTRACE and PERFMON (${message}): mirror in a namespace whose level is privileged, or ask your cluster admin`
          : `the agent's pod cannot be created: ${message}`,
      ),
    );
  }

  get describeState(): string {
    return this.podName ? `pod ${this.podName}: ${this.state}` : this.state;
  }

  succeed(readiness: AgentReadiness): void {
    if (this.settled || !this.podName) return;
    this.settled = true;
    this.streams.abort();
    this.resolve({ pod: this.podName, readiness });
  }

  fail(error: Error): void {
    if (this.settled) return;
    this.settled = true;
    this.streams.abort();
    this.reject(error);
  }

  private note(key: string, text: string): void {
    if (this.noted.has(key)) return;
    this.noted.add(key);
    this.progress(text);
  }

  /** One pod event (from a watch or a list): what it says about the agent's start. */
  onPod(type: string, pod: V1Pod): void {
    if (this.settled || this.ending) return;
    this.podName = pod.metadata?.name ?? this.podName;
    if (type === 'DELETED') {
      this.fail(
        new KubeError(`the agent pod ${this.podName} was deleted before the agent was ready`),
      );
      return;
    }
    const node = pod.spec?.nodeName;
    const scheduled = pod.status?.conditions?.find((c) => c.type === 'PodScheduled');
    if (scheduled?.status === 'False' && scheduled.reason === 'Unschedulable') {
      this.fail(
        new KubeError(
          `the agent cannot be scheduled on the target's node: ${scheduled.message ?? 'Unschedulable'}`,
        ),
      );
      return;
    }
    const status = pod.status?.containerStatuses?.find((s) => s.name === AGENT_CONTAINER);
    const waiting = status?.state?.waiting;
    const terminated = status?.state?.terminated;
    this.state = `${pod.status?.phase ?? 'Pending'}${waiting?.reason ? `: ${waiting.reason}` : ''}`;
    if (waiting?.reason && IMAGE_PULL_FAILURES.has(waiting.reason)) {
      this.fail(
        new KubeError(
          `cannot pull the agent image ${this.image} (${waiting.reason}): ${waiting.message ?? 'no details'}; check --agent-image and --agent-pull-secret`,
        ),
      );
      return;
    }
    if (waiting?.reason && CONTAINER_START_FAILURES.has(waiting.reason)) {
      this.fail(
        new KubeError(
          `the agent container cannot start (${waiting.reason}): ${waiting.message ?? 'no details'}`,
        ),
      );
      return;
    }
    if (terminated || pod.status?.phase === 'Failed' || pod.status?.phase === 'Succeeded') {
      void this.exited(terminated?.exitCode, terminated?.reason ?? pod.status?.reason);
      return;
    }
    if (status?.state?.running) {
      this.note('starting', 'starting the agent');
      this.followLog();
    } else if (node || scheduled?.status === 'True') {
      this.note('pulling', `pulling image ${this.image} on node ${node ?? 'of the target'}`);
    }
  }

  private logSource(): LogSource {
    return { namespace: this.namespace, pod: this.podName ?? '', container: AGENT_CONTAINER };
  }

  /** Reads the agent's log until its readiness line; follows again if the server cuts it. */
  private followLog(): void {
    if (this.following) return;
    this.following = true;
    const onLine = (line: string): void => {
      const readiness = readinessOf(line);
      if (readiness) {
        this.succeed(readiness);
        return;
      }
      this.recentLines.push(line);
      if (this.recentLines.length > LOG_LINES_KEPT) this.recentLines.shift();
    };
    void (async () => {
      while (!this.settled) {
        this.recentLines = [];
        try {
          await followPodLog(this.access, this.logSource(), onLine, this.streams.signal);
        } catch (error) {
          // The pod may have just ended: let its watch event say why before reporting this.
          await delay(1000);
          if (!this.ending) this.fail(error as Error);
          return;
        }
        if (!this.settled) await delay(250);
      }
    })();
  }

  private async exited(exitCode: number | undefined, reason: string | undefined): Promise<void> {
    this.ending = true;
    const kept = this.recentLines;
    const lines = await podLogTail(this.access, this.logSource(), LOG_LINES_KEPT).catch(() => []);
    const code = exitCode === undefined ? '' : ` (exit code ${exitCode})`;
    const why = exitReason(lines.length > 0 ? lines : kept, reason ?? 'it printed nothing');
    this.fail(new KubeError(`the agent exited before it was ready${code}: ${why}`));
  }
}

/**
 * Keeps a watch on the agent's pods until the startup is settled: after each (re)start of the
 * watch it lists them too, so nothing that happened in between is missed.
 */
async function watchAgentPods(
  access: KubeAccess,
  namespace: string,
  labelSelector: string,
  startup: AgentStartup,
  signal: AbortSignal,
): Promise<void> {
  const path = `/api/v1/namespaces/${encodeURIComponent(namespace)}/pods`;
  const watch = new Watch(access.config);
  while (!signal.aborted) {
    const ended = new Promise<unknown>((resolve) => {
      void watch
        .watch(path, { labelSelector }, (type, pod: V1Pod) => startup.onPod(type, pod), resolve)
        .then((controller) => {
          if (signal.aborted) controller.abort();
          else signal.addEventListener('abort', () => controller.abort(), { once: true });
        }, resolve);
    });
    const pods = await apiCall(access, { verb: 'list', resource: 'pods', namespace }, () =>
      access.core.listNamespacedPod({ namespace, labelSelector }),
    );
    for (const pod of pods.items) startup.onPod('ADDED', pod);
    const error = await ended;
    if (signal.aborted) return;
    if (error && statusCodeOf(error) !== 410) {
      throw kubeApiError(error, { verb: 'watch', resource: 'pods', namespace }, access);
    }
    // The server ended the watch (its timeout, or 410 Gone): start again.
    await delay(200);
  }
}

/** How often the agent Job's events are read while its pod does not exist. */
const FAILED_CREATE_POLL_MS = 1000;

/**
 * Reads the agent Job's FailedCreate events until its pod exists: when the Job controller cannot
 * create the pod (a Pod Security admission refusing the agent, a quota), only an event tells.
 * Without `list events` it stops, and the startup timeout says what it can.
 */
async function watchFailedCreates(
  access: KubeAccess,
  namespace: string,
  job: string,
  startup: AgentStartup,
  signal: AbortSignal,
): Promise<void> {
  const fieldSelector = `involvedObject.kind=Job,involvedObject.name=${job},reason=FailedCreate`;
  while (!signal.aborted && !startup.hasPod) {
    let message: string | undefined;
    try {
      const events = await access.core.listNamespacedEvent({ namespace, fieldSelector });
      message = events.items.findLast((event) => event.message)?.message;
    } catch {
      return;
    }
    if (message) {
      startup.failCreate(message);
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, FAILED_CREATE_POLL_MS).unref());
  }
}

/**
 * Creates the agent's Job and then its Secret (owned by the Job, so it needs the Job's uid),
 * waits until its pod is running and the agent printed its readiness line, and reports progress
 * on the way. Fails fast with one line on RBAC denial, image pull failure, Unschedulable, an
 * agent exiting early, or the startup timeout; in every failure it deletes the Job it created
 * before throwing, and the garbage collector deletes the Secret with it.
 */
export async function startAgentJob(options: AgentJobStart): Promise<RunningAgentJob> {
  const { access, job, progress } = options;
  const namespace = job.metadata?.namespace ?? access.namespace;
  const name = job.metadata?.name ?? '';
  const session = job.metadata?.labels?.[LABELS.session] ?? '';
  const image = job.spec?.template.spec?.containers[0]?.image ?? '';
  const remove = jobRemover(access, namespace, name);
  const streams = new AbortController();
  const startup = new AgentStartup(access, namespace, image, progress, streams);
  let created = false;
  let timer: NodeJS.Timeout | undefined;
  const interrupted = (): KubeError =>
    Object.assign(new KubeError('interrupted while the agent was starting'), {
      oclif: { exit: 130 },
    });
  const interrupt = (): void => startup.fail(interrupted());
  if (options.signal?.aborted) throw interrupted();
  try {
    options.signal?.addEventListener('abort', interrupt, { once: true });
    progress(`creating agent Job ${name} in namespace ${namespace}`);
    const made = await apiCall(
      access,
      { verb: 'create', resource: 'jobs.batch', namespace, name },
      () => access.batch.createNamespacedJob({ namespace, body: job }),
    );
    created = true;
    const jobUid = made.metadata?.uid;
    if (!jobUid) throw new KubeError(`the API server returned the agent Job ${name} without a uid`);
    // The pod waits for it (its volume), so the agent cannot start without its secret. A CLI
    // killed before this request leaves a Job whose pod never starts: `mirrord cleanup` removes
    // it (its CLI is gone, or it never started).
    await apiCall(access, { verb: 'create', resource: 'secrets', namespace, name }, () =>
      access.core.createNamespacedSecret({
        namespace,
        body: agentSecretManifest(job, { jobUid, secret: options.secret }),
      }),
    );
    timer = setTimeout(() => {
      const seconds = Math.round(options.startupTimeoutMs / 1000);
      startup.fail(
        new KubeError(
          `the agent did not start within ${seconds} s (${startup.describeState}): raise --agent-startup-timeout, or see kubectl describe job ${name} -n ${namespace}`,
        ),
      );
    }, options.startupTimeoutMs);
    watchAgentPods(
      access,
      namespace,
      `${LABELS.session}=${session}`,
      startup,
      streams.signal,
    ).catch((error: Error) => startup.fail(error));
    void watchFailedCreates(access, namespace, name, startup, streams.signal);
    const { pod, readiness } = await startup.done;
    return { namespace, job: name, pod, readiness, remove };
  } catch (error) {
    if (created) {
      try {
        await remove();
      } catch (removeError) {
        throw new KubeError(`${(error as Error).message}; also ${(removeError as Error).message}`);
      }
    }
    throw error;
  } finally {
    clearTimeout(timer);
    streams.abort();
    options.signal?.removeEventListener('abort', interrupt);
  }
}
