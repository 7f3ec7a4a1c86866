import { EventEmitter } from 'node:events';

/**
 * Failures a test can switch on, each reproducing what a real cluster shows in that situation:
 * RBAC denials, images that cannot be pulled, a node that takes no more pods, a kubelet stuck
 * creating containers.
 */
export interface ClusterFaults {
  /**
   * Answers requests for `verb` on `resource` (`jobs`, `pods/log`, `pods/portforward`, …)
   * with 403 Forbidden. `group` ('' for core, 'batch', 'apps') narrows it; left out, any
   * group. The WebSocket port-forward is denied by `create` (what RBAC requires for it) as
   * well as by `get` (the verb of its HTTP request).
   */
  deny(verb: string, resource: string, group?: string): void;
  /** Containers whose image matches get ErrImagePull, then ImagePullBackOff. */
  failImagePull(imagePattern: RegExp): void;
  /** New pods stay Pending: PodScheduled False, reason Unschedulable. Off: they are placed. */
  unschedulable(on: boolean): void;
  /** New pods stay Pending in ContainerCreating. Off: they start. */
  holdContainerCreating(on: boolean): void;
  /** Switches every fault off again. */
  clear(): void;
}

interface Denial {
  verb: string;
  resource: string;
  group: string | undefined;
}

/** The faults' state, read by the API server, the scheduler and the kubelet. */
export class FaultState extends EventEmitter<{ changed: [] }> implements ClusterFaults {
  #denials: Denial[] = [];
  #imagePatterns: RegExp[] = [];
  #unschedulable = false;
  #holdContainerCreating = false;

  deny(verb: string, resource: string, group?: string): void {
    this.#denials.push({ verb, resource, group });
  }

  failImagePull(imagePattern: RegExp): void {
    this.#imagePatterns.push(imagePattern);
  }

  unschedulable(on: boolean): void {
    this.#unschedulable = on;
    this.emit('changed');
  }

  holdContainerCreating(on: boolean): void {
    this.#holdContainerCreating = on;
    this.emit('changed');
  }

  clear(): void {
    this.#denials = [];
    this.#imagePatterns = [];
    this.#unschedulable = false;
    this.#holdContainerCreating = false;
    this.emit('changed');
  }

  isDenied(verbs: string[], resource: string, group: string): string | undefined {
    const denial = this.#denials.find(
      (d) =>
        verbs.includes(d.verb) &&
        d.resource === resource &&
        (d.group === undefined || d.group === group),
    );
    return denial?.verb;
  }

  imagePullFails(image: string): boolean {
    return this.#imagePatterns.some((pattern) => pattern.test(image));
  }

  get isUnschedulable(): boolean {
    return this.#unschedulable;
  }

  get holdsContainerCreating(): boolean {
    return this.#holdContainerCreating;
  }
}
