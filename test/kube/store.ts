import { randomUUID } from 'node:crypto';
import { alreadyExists, notFound } from './errors.js';
import { RESOURCES, randomSuffix, timestamp, type KubeObject, type ResourceName } from './types.js';

/**
 * The stand-in's etcd: every object by resource, namespace and name, one resourceVersion
 * counter for all of them, and the ordered stream of changes that watches and controllers
 * follow.
 */

export type WatchEventType = 'ADDED' | 'MODIFIED' | 'DELETED';

export interface StoreEvent {
  type: WatchEventType;
  resource: ResourceName;
  /** A copy: listeners may keep it. */
  object: KubeObject;
  resourceVersion: number;
}

export type StoreListener = (event: StoreEvent) => void;

/** How many past events a watch may resume from; an older resourceVersion gets 410 Gone. */
const HISTORY_LIMIT = 10_000;

function keyOf(namespace: string | undefined, name: string): string {
  return `${namespace ?? ''}/${name}`;
}

export class ObjectStore {
  readonly #objects = new Map<ResourceName, Map<string, KubeObject>>();
  #resourceVersion = 1000;
  readonly #history: StoreEvent[] = [];
  readonly #listeners = new Set<StoreListener>();
  readonly #pending: StoreEvent[] = [];
  #dispatching = false;

  get resourceVersion(): number {
    return this.#resourceVersion;
  }

  #table(resource: ResourceName): Map<string, KubeObject> {
    let table = this.#objects.get(resource);
    if (!table) {
      table = new Map();
      this.#objects.set(resource, table);
    }
    return table;
  }

  /**
   * Stores a new object: fills in uid (unless admission chose it), resourceVersion,
   * creationTimestamp and a name from generateName. Throws AlreadyExists.
   */
  create<T extends KubeObject>(resource: ResourceName, object: T): T {
    const stored = structuredClone(object);
    const meta = stored.metadata;
    if (!meta.name && meta.generateName) meta.name = `${meta.generateName}${randomSuffix()}`;
    const name = meta.name ?? '';
    const table = this.#table(resource);
    const namespace = RESOURCES[resource].namespaced ? meta.namespace : undefined;
    if (table.has(keyOf(namespace, name))) throw alreadyExists(RESOURCES[resource], name);
    meta.uid ??= randomUUID();
    meta.creationTimestamp = timestamp();
    meta.generation = 1;
    this.#resourceVersion += 1;
    meta.resourceVersion = String(this.#resourceVersion);
    table.set(keyOf(namespace, name), stored);
    this.#commit('ADDED', resource, stored);
    return structuredClone(stored);
  }

  get<T extends KubeObject>(
    resource: ResourceName,
    namespace: string | undefined,
    name: string,
  ): T | undefined {
    const object = this.#table(resource).get(keyOf(this.#scope(resource, namespace), name));
    return object ? (structuredClone(object) as T) : undefined;
  }

  mustGet<T extends KubeObject>(
    resource: ResourceName,
    namespace: string | undefined,
    name: string,
  ): T {
    const object = this.get<T>(resource, namespace, name);
    if (!object) throw notFound(RESOURCES[resource], name);
    return object;
  }

  /** Objects of a namespace, or of all namespaces when `namespace` is undefined. */
  list<T extends KubeObject>(resource: ResourceName, namespace?: string): T[] {
    const objects = [...this.#table(resource).values()].filter(
      (o) => namespace === undefined || o.metadata.namespace === namespace,
    );
    return objects.map((o) => structuredClone(o) as T);
  }

  findByUid(uid: string): { resource: ResourceName; object: KubeObject } | undefined {
    for (const [resource, table] of this.#objects) {
      for (const object of table.values()) {
        if (object.metadata.uid === uid) return { resource, object: structuredClone(object) };
      }
    }
    return undefined;
  }

  /** Objects of any resource that name `uid` in their ownerReferences. */
  dependentsOf(uid: string): { resource: ResourceName; object: KubeObject }[] {
    const found: { resource: ResourceName; object: KubeObject }[] = [];
    for (const [resource, table] of this.#objects) {
      for (const object of table.values()) {
        if (object.metadata.ownerReferences?.some((ref) => ref.uid === uid)) {
          found.push({ resource, object: structuredClone(object) });
        }
      }
    }
    return found;
  }

  /**
   * Applies `mutate` to a copy of the object and stores it if anything changed (new
   * resourceVersion, MODIFIED event). Returns the stored object, or undefined if it is gone.
   */
  update<T extends KubeObject>(
    resource: ResourceName,
    namespace: string | undefined,
    name: string,
    mutate: (object: T) => void,
  ): T | undefined {
    const table = this.#table(resource);
    const key = keyOf(this.#scope(resource, namespace), name);
    const current = table.get(key);
    if (!current) return undefined;
    const next = structuredClone(current) as T;
    mutate(next);
    if (JSON.stringify(next) === JSON.stringify(current)) return structuredClone(next);
    this.#resourceVersion += 1;
    next.metadata.resourceVersion = String(this.#resourceVersion);
    table.set(key, next);
    this.#commit('MODIFIED', resource, next);
    return structuredClone(next);
  }

  /** Removes the object for good (after graceful deletion and finalizers): a DELETED event. */
  remove(
    resource: ResourceName,
    namespace: string | undefined,
    name: string,
  ): KubeObject | undefined {
    const table = this.#table(resource);
    const key = keyOf(this.#scope(resource, namespace), name);
    const current = table.get(key);
    if (!current) return undefined;
    table.delete(key);
    this.#resourceVersion += 1;
    current.metadata.resourceVersion = String(this.#resourceVersion);
    this.#commit('DELETED', resource, current);
    return structuredClone(current);
  }

  /**
   * Every change from now on, in resourceVersion order. A listener that changes the store sees
   * its own change after the current event has reached every listener.
   */
  subscribe(listener: StoreListener): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** The events after `resourceVersion`, or undefined when they are no longer kept. */
  eventsSince(resourceVersion: number): StoreEvent[] | undefined {
    const oldest = this.#history[0];
    if (oldest && resourceVersion < oldest.resourceVersion - 1) return undefined;
    return this.#history.filter((event) => event.resourceVersion > resourceVersion);
  }

  #scope(resource: ResourceName, namespace: string | undefined): string | undefined {
    return RESOURCES[resource].namespaced ? namespace : undefined;
  }

  #commit(type: WatchEventType, resource: ResourceName, object: KubeObject): void {
    const event: StoreEvent = {
      type,
      resource,
      object: structuredClone(object),
      resourceVersion: this.#resourceVersion,
    };
    this.#history.push(event);
    if (this.#history.length > HISTORY_LIMIT) this.#history.shift();
    this.#pending.push(event);
    if (this.#dispatching) return;
    this.#dispatching = true;
    try {
      for (let next = this.#pending.shift(); next; next = this.#pending.shift()) {
        for (const listener of [...this.#listeners]) {
          try {
            listener(next);
          } catch (error) {
            // A broken controller must not stop the others or the watches: say so and go on.
            console.error(`stand-in API server: a ${next.resource} listener failed:`, error);
          }
        }
      }
    } finally {
      this.#dispatching = false;
    }
  }
}
