import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { constants } from 'node:os';
import { join } from 'node:path';
import { packageRoot } from '../../src/package-root.js';
import type { CgroupTree } from './cgroups.js';
import { ContainerLog } from './container-log.js';
import type { FaultState } from './faults.js';
import { containerArgv, imageId, imageKind, pullBackOff, pullFailure } from './images.js';
import { NODE_IP, type PodNetwork, type PodSandbox } from './pod-network.js';
import type { ObjectStore, StoreEvent } from './store.js';
import {
  setCondition,
  timestamp,
  type Condition,
  type Container,
  type ContainerState,
  type ContainerStatus,
  type Pod,
  type PodPhase,
  type PodStatus,
} from './types.js';

/**
 * The node's kubelet: runs the pods bound to the node as local processes. Each pod gets a
 * netns wired to the pod network; each container instance gets a fresh 64-hex container id
 * and a cgroup named after it (`cri-containerd-<id>.scope`), and runs its command inside the
 * pod's netns with stdout and stderr kept for pods/log. Status goes back to the API the way the
 * real kubelet reports it: Pending (ContainerCreating, ErrImagePull, ImagePullBackOff) →
 * Running (Ready once every declared containerPort accepts a connection: the ports serve as
 * an implicit TCP readiness probe, checked until they answer and not after, so that probes do
 * not show up in mirrored traffic) → Succeeded/Failed. Deleting a pod sends SIGTERM to its
 * containers and SIGKILL after the grace period. hostPID, privileged and capabilities are
 * recorded, not enforced: every process shares the host's PID namespace and runs as root.
 */

interface ContainerInstance {
  id: string;
  cgroup: string;
  child: ChildProcess;
  log: ContainerLog;
  startedAt: string;
  ready: boolean;
  exit?: { exitCode: number; signal?: number; finishedAt: string };
  /** Resolves once the process is gone and its output read to the end. */
  closed: Promise<void>;
  isClosed: boolean;
}

interface ContainerRuntime {
  spec: Container;
  /** Why no instance runs right now, if none does. */
  waiting?: { reason: string; message?: string };
  instances: ContainerInstance[];
  restartCount: number;
  pulled: boolean;
}

interface PodRuntime {
  uid: string;
  namespace: string;
  name: string;
  pod: Pod;
  qosClass: string;
  startTime: string;
  containers: ContainerRuntime[];
  sandbox?: PodSandbox;
  ip?: string;
  held: boolean;
  finished: boolean;
  terminating: boolean;
  forgotten: boolean;
  timers: Set<NodeJS.Timeout>;
  cleanups: Promise<void>[];
}

export interface ContainerInfo {
  name: string;
  /** `containerd://<64 hex>`, as containerStatuses[].containerID. */
  containerId: string;
  pid: number;
}

export interface PodRuntimeInfo {
  netns?: string;
  ip?: string;
  /** The current instance of each container that was started. */
  containers: ContainerInfo[];
}

/** What pods/log reads: the logs of a container's instances, oldest first, and why none runs. */
export interface ContainerLogs {
  instances: { log: ContainerLog }[];
  waiting?: { reason: string; message?: string };
}

const IMAGE_BACKOFF_MS = 1_000;
const RESTART_BACKOFF_MS = 1_000;
const PROBE_INTERVAL_MS = 100;
const KILL_WAIT_MS = 10_000;

/** Waits for `promise`, at most `ms`; the timer does not outlive the wait. */
async function atMost(promise: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([promise, new Promise((resolve) => (timer = setTimeout(resolve, ms)))]);
  clearTimeout(timer);
}

/** Whether something in `netns` accepts TCP connections at address:port right now. */
function acceptsTcp(netns: string, address: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    execFile(
      'ip',
      ['netns', 'exec', netns, 'bash', '-c', `exec 3<>/dev/tcp/${address}/${port}`],
      (error) => resolve(!error),
    );
  });
}

function qosClassOf(pod: Pod): string {
  const constrained = pod.spec.containers.some((c) => {
    const resources = c.resources as { requests?: object; limits?: object } | undefined;
    return Boolean(resources?.requests || resources?.limits);
  });
  return constrained ? 'Burstable' : 'BestEffort';
}

export class Kubelet {
  readonly #pods = new Map<string, PodRuntime>();
  readonly #unsubscribe: () => void;
  #closed = false;

  constructor(
    private readonly store: ObjectStore,
    private readonly nodeName: string,
    private readonly network: PodNetwork,
    private readonly cgroups: CgroupTree,
    private readonly faults: FaultState,
  ) {
    this.#unsubscribe = store.subscribe((event) => this.#onEvent(event));
    faults.on('changed', this.#releaseHeld);
  }

  runtimeInfo(uid: string): PodRuntimeInfo | undefined {
    const runtime = this.#pods.get(uid);
    if (!runtime) return undefined;
    const containers: ContainerInfo[] = [];
    for (const container of runtime.containers) {
      const current = container.instances.at(-1);
      if (current) {
        containers.push({
          name: container.spec.name,
          containerId: `containerd://${current.id}`,
          pid: current.child.pid ?? 0,
        });
      }
    }
    return { netns: runtime.sandbox?.netns, ip: runtime.ip, containers };
  }

  /** The netns of a running pod, for port-forwarding. */
  sandboxOf(uid: string): PodSandbox | undefined {
    const runtime = this.#pods.get(uid);
    return runtime && !runtime.finished && !runtime.terminating ? runtime.sandbox : undefined;
  }

  containerLogs(uid: string, containerName: string): ContainerLogs | undefined {
    const container = this.#pods.get(uid)?.containers.find((c) => c.spec.name === containerName);
    if (!container) return undefined;
    return {
      instances: container.instances.map((i) => ({ log: i.log })),
      waiting: container.waiting,
    };
  }

  /** Pids of every container process that runs. */
  processes(): number[] {
    const pids: number[] = [];
    for (const runtime of this.#pods.values()) {
      for (const container of runtime.containers) {
        for (const instance of container.instances) {
          if (!instance.isClosed && instance.child.pid) pids.push(instance.child.pid);
        }
      }
    }
    return pids;
  }

  /** Kills every container at once and removes every cgroup and pod netns. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#unsubscribe();
    this.faults.off('changed', this.#releaseHeld);
    await Promise.all([...this.#pods.values()].map((runtime) => this.#forget(runtime)));
  }

  #onEvent(event: StoreEvent): void {
    if (event.resource !== 'pods' || this.#closed) return;
    const pod = event.object as Pod;
    const uid = pod.metadata.uid ?? '';
    const known = this.#pods.get(uid);
    if (event.type === 'DELETED') {
      if (known) void this.#forget(known);
      return;
    }
    if (pod.spec.nodeName !== this.nodeName) return;
    const runtime = known ?? this.#admit(pod);
    if (pod.metadata.deletionTimestamp && !runtime.terminating) {
      void this.#terminate(runtime, pod.metadata.deletionGracePeriodSeconds ?? 30);
    }
  }

  #admit(pod: Pod): PodRuntime {
    const runtime: PodRuntime = {
      uid: pod.metadata.uid ?? '',
      namespace: pod.metadata.namespace ?? 'default',
      name: pod.metadata.name ?? '',
      pod,
      qosClass: qosClassOf(pod),
      startTime: timestamp(),
      containers: pod.spec.containers.map((spec) => ({
        spec,
        waiting: { reason: 'ContainerCreating' },
        instances: [],
        restartCount: 0,
        pulled: false,
      })),
      held: false,
      finished: false,
      terminating: false,
      forgotten: false,
      timers: new Set(),
      cleanups: [],
    };
    this.#pods.set(runtime.uid, runtime);
    this.#publish(runtime);
    if (!pod.metadata.deletionTimestamp) {
      if (this.faults.holdsContainerCreating) runtime.held = true;
      else void this.#start(runtime);
    }
    return runtime;
  }

  readonly #releaseHeld = (): void => {
    if (this.faults.holdsContainerCreating) return;
    for (const runtime of this.#pods.values()) {
      if (runtime.held && !runtime.terminating) {
        runtime.held = false;
        void this.#start(runtime);
      }
    }
  };

  async #start(runtime: PodRuntime): Promise<void> {
    let sandbox: PodSandbox;
    try {
      sandbox = await this.network.createSandbox();
    } catch (error) {
      for (const container of runtime.containers) {
        container.waiting = {
          reason: 'ContainerCreating',
          message: `failed to create pod sandbox: ${(error as Error).message}`,
        };
      }
      this.#publish(runtime);
      return;
    }
    if (runtime.terminating || runtime.forgotten || this.#closed) {
      this.network.removeSandbox(sandbox.netns);
      return;
    }
    runtime.sandbox = sandbox;
    runtime.ip = sandbox.ip;
    for (const container of runtime.containers) this.#startContainer(runtime, container);
    this.#publish(runtime);
  }

  #later(runtime: PodRuntime, ms: number, action: () => void): void {
    const timer = setTimeout(() => {
      runtime.timers.delete(timer);
      if (!runtime.terminating && !runtime.forgotten) action();
    }, ms);
    runtime.timers.add(timer);
  }

  #startContainer(runtime: PodRuntime, container: ContainerRuntime): void {
    const sandbox = runtime.sandbox;
    if (!sandbox) return;
    const image = container.spec.image;
    const kind = imageKind(image);
    if (!kind || this.faults.imagePullFails(image)) {
      container.waiting = { reason: 'ErrImagePull', message: pullFailure(image) };
      this.#later(runtime, IMAGE_BACKOFF_MS, () => {
        container.waiting = { reason: 'ImagePullBackOff', message: pullBackOff(image) };
        this.#publish(runtime);
      });
      return;
    }
    container.pulled = true;
    const argv = containerArgv(container.spec, kind);
    if (!argv) {
      container.waiting = {
        reason: 'CreateContainerError',
        message: 'failed to generate container spec: no command specified',
      };
      return;
    }
    const id = randomBytes(32).toString('hex');
    const cgroup = this.cgroups.createContainer(runtime.uid, runtime.qosClass, id);
    const env: NodeJS.ProcessEnv = { ...process.env };
    for (const variable of container.spec.env ?? []) env[variable.name] = variable.value ?? '';
    // The process joins its container's cgroup before it execs, so that everything it starts
    // is in the cgroup too; `ip netns exec` then execs the command in place, so the pid is the
    // command's own. `ip netns exec` also remounts /sys for the netns: the agent still loads
    // and attaches its BPF program there (checked), so no plain `nsenter --net` is needed.
    const child = spawn(
      'sh',
      [
        '-c',
        'echo $$ > "$0" && exec "$@"',
        join(cgroup, 'cgroup.procs'),
        'ip',
        'netns',
        'exec',
        sandbox.netns,
        ...argv,
      ],
      {
        cwd: container.spec.workingDir ?? packageRoot(),
        env,
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    // The shell puts itself in the cgroup too, but only once it runs: written here as well, the
    // container's process is in its cgroup before the pod is published as Running (a process
    // gone already cannot be moved, and needs not be).
    try {
      if (child.pid !== undefined) writeFileSync(join(cgroup, 'cgroup.procs'), String(child.pid));
    } catch {
      // Exited at once: its exit is recorded below.
    }
    const log = new ContainerLog();
    log.attach(child.stdout!);
    log.attach(child.stderr!);
    let markClosed!: () => void;
    const instance: ContainerInstance = {
      id,
      cgroup,
      child,
      log,
      startedAt: timestamp(),
      ready: !container.spec.ports?.length,
      closed: new Promise((resolve) => (markClosed = resolve)),
      isClosed: false,
    };
    container.instances.push(instance);
    container.waiting = undefined;
    const recordExit = (code: number | null, signal: NodeJS.Signals | null): void => {
      if (instance.exit) return;
      const signalNumber = signal ? constants.signals[signal] : undefined;
      instance.exit = {
        exitCode: code ?? 128 + (signalNumber ?? 0),
        ...(signalNumber ? { signal: signalNumber } : {}),
        finishedAt: timestamp(),
      };
      // Like containerd when a container's init exits: nothing of the container outlives it.
      this.cgroups.kill(cgroup);
    };
    const onClosed = (): void => {
      if (instance.isClosed) return;
      instance.isClosed = true;
      recordExit(127, null);
      runtime.cleanups.push(this.cgroups.remove(cgroup).catch(() => undefined));
      markClosed();
      this.#containerExited(runtime, container, instance);
    };
    child.once('exit', recordExit);
    child.once('close', onClosed);
    child.once('error', (error) => {
      log.note(error.message);
      if (child.pid === undefined) onClosed();
    });
    if (!instance.ready) this.#probe(runtime, container, instance);
  }

  /**
   * Probes the container's ports until they all answer. The wait between probes is one of the
   * pod's timers, so that it ends with the pod (and with close()).
   */
  #probe(runtime: PodRuntime, container: ContainerRuntime, instance: ContainerInstance): void {
    const sandbox = runtime.sandbox;
    const gone = (): boolean => instance.isClosed || runtime.terminating || runtime.forgotten;
    if (!sandbox || gone()) return;
    const ports = (container.spec.ports ?? []).map((p) => p.containerPort);
    void Promise.all(ports.map((port) => acceptsTcp(sandbox.netns, sandbox.ip, port))).then(
      (answers) => {
        if (gone()) return;
        if (answers.every(Boolean)) {
          instance.ready = true;
          this.#publish(runtime);
          return;
        }
        this.#later(runtime, PROBE_INTERVAL_MS, () => this.#probe(runtime, container, instance));
      },
    );
  }

  #containerExited(
    runtime: PodRuntime,
    container: ContainerRuntime,
    instance: ContainerInstance,
  ): void {
    if (runtime.terminating || runtime.forgotten) return;
    const policy = runtime.pod.spec.restartPolicy ?? 'Always';
    const failed = (instance.exit?.exitCode ?? 1) !== 0;
    if (policy === 'Always' || (policy === 'OnFailure' && failed)) {
      container.waiting = {
        reason: 'CrashLoopBackOff',
        message: `back-off 10s restarting failed container=${container.spec.name} pod=${runtime.name}_${runtime.namespace}(${runtime.uid})`,
      };
      this.#publish(runtime);
      this.#later(runtime, RESTART_BACKOFF_MS, () => {
        container.restartCount += 1;
        this.#startContainer(runtime, container);
        this.#publish(runtime);
      });
      return;
    }
    const done = runtime.containers.every((c) => c.instances.at(-1)?.isClosed && !c.waiting);
    if (done) {
      runtime.finished = true;
      this.#publish(runtime);
      // The sandbox of a finished pod is stopped: whatever still runs in its netns goes.
      if (runtime.sandbox) this.network.removeSandbox(runtime.sandbox.netns);
      runtime.sandbox = undefined;
      return;
    }
    this.#publish(runtime);
  }

  async #terminate(runtime: PodRuntime, graceSeconds: number): Promise<void> {
    runtime.terminating = true;
    for (const timer of runtime.timers) clearTimeout(timer);
    runtime.timers.clear();
    const running = runtime.containers.flatMap((c) => c.instances.filter((i) => !i.isClosed));
    for (const instance of running) {
      instance.child.kill('SIGTERM');
      this.cgroups.signal(instance.cgroup, 'SIGTERM');
    }
    const allClosed = Promise.all(running.map((i) => i.closed));
    await atMost(allClosed, graceSeconds * 1000);
    for (const instance of running.filter((i) => !i.isClosed)) {
      this.cgroups.kill(instance.cgroup);
      instance.child.kill('SIGKILL');
    }
    await atMost(allClosed, KILL_WAIT_MS);
    this.#teardown(runtime);
    await Promise.all(runtime.cleanups);
    this.store.remove('pods', runtime.namespace, runtime.name);
  }

  #teardown(runtime: PodRuntime): void {
    for (const timer of runtime.timers) clearTimeout(timer);
    runtime.timers.clear();
    if (runtime.sandbox) this.network.removeSandbox(runtime.sandbox.netns);
    runtime.sandbox = undefined;
  }

  /** The pod object is gone: kill what is left of it at once and free everything. */
  async #forget(runtime: PodRuntime): Promise<void> {
    if (runtime.forgotten) return;
    runtime.forgotten = true;
    const running = runtime.containers.flatMap((c) => c.instances.filter((i) => !i.isClosed));
    for (const instance of running) {
      this.cgroups.kill(instance.cgroup);
      instance.child.kill('SIGKILL');
    }
    this.#teardown(runtime);
    await atMost(Promise.all(running.map((i) => i.closed)), KILL_WAIT_MS);
    await Promise.all(runtime.cleanups);
    this.#pods.delete(runtime.uid);
  }

  #publish(runtime: PodRuntime): void {
    if (runtime.forgotten || this.#closed) return;
    this.store.update<Pod>('pods', runtime.namespace, runtime.name, (pod) => {
      if (pod.metadata.uid !== runtime.uid) return;
      pod.status = this.#status(runtime, pod.status);
    });
  }

  #status(runtime: PodRuntime, previous: PodStatus): PodStatus {
    const statuses = runtime.containers.map((c) => containerStatus(c));
    const everStarted = runtime.containers.every((c) => c.instances.length > 0);
    const allSucceeded = runtime.containers.every((c) => c.instances.at(-1)?.exit?.exitCode === 0);
    const phase: PodPhase = runtime.finished
      ? allSucceeded
        ? 'Succeeded'
        : 'Failed'
      : everStarted
        ? 'Running'
        : 'Pending';
    const unready = statuses.filter((s) => !s.ready).map((s) => s.name);
    let conditions: Condition[] = previous.conditions ?? [];
    const set = (type: string, ok: boolean, reason?: string, message?: string): void => {
      conditions = setCondition(conditions, {
        type,
        status: ok ? 'True' : 'False',
        ...(ok || !reason ? {} : { reason }),
        ...(ok || !message ? {} : { message }),
        lastProbeTime: null,
      });
    };
    set('PodReadyToStartContainers', Boolean(runtime.sandbox));
    set('Initialized', true);
    const notReady = runtime.finished ? 'PodCompleted' : 'ContainersNotReady';
    const notReadyMessage = runtime.finished
      ? undefined
      : `containers with unready status: [${unready.join(' ')}]`;
    set('ContainersReady', unready.length === 0, notReady, notReadyMessage);
    set('Ready', unready.length === 0, notReady, notReadyMessage);
    return {
      phase,
      conditions,
      hostIP: NODE_IP,
      hostIPs: [{ ip: NODE_IP }],
      ...(runtime.ip ? { podIP: runtime.ip, podIPs: [{ ip: runtime.ip }] } : {}),
      startTime: runtime.startTime,
      containerStatuses: statuses,
      qosClass: runtime.qosClass,
    };
  }
}

function terminatedState(instance: ContainerInstance): ContainerState {
  const exit = instance.exit;
  return {
    terminated: {
      exitCode: exit?.exitCode ?? 0,
      ...(exit?.signal ? { signal: exit.signal } : {}),
      reason: exit?.exitCode === 0 ? 'Completed' : 'Error',
      startedAt: instance.startedAt,
      finishedAt: exit?.finishedAt ?? timestamp(),
      containerID: `containerd://${instance.id}`,
    },
  };
}

function containerStatus(container: ContainerRuntime): ContainerStatus {
  const current = container.instances.at(-1);
  const previous = container.instances.at(-2);
  const base = {
    name: container.spec.name,
    image: container.spec.image,
    imageID: container.pulled ? imageId(container.spec.image) : '',
    restartCount: container.restartCount,
  };
  if (current && !current.isClosed) {
    return {
      ...base,
      containerID: `containerd://${current.id}`,
      ready: current.ready,
      started: true,
      state: { running: { startedAt: current.startedAt } },
      lastState: previous ? terminatedState(previous) : {},
    };
  }
  if (container.waiting) {
    return {
      ...base,
      ...(current ? { containerID: `containerd://${current.id}` } : {}),
      ready: false,
      started: false,
      state: { waiting: container.waiting },
      lastState: current ? terminatedState(current) : {},
    };
  }
  return {
    ...base,
    ...(current ? { containerID: `containerd://${current.id}` } : {}),
    ready: false,
    started: false,
    state: current ? terminatedState(current) : { waiting: { reason: 'ContainerCreating' } },
    lastState: previous ? terminatedState(previous) : {},
  };
}
