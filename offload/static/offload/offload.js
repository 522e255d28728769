/*!
 * offload.js: a small websocket client for the offload wire protocol
 * (docs/protocol.md). Plain script with no dependencies. It defines window.OffloadClient.
 *
 *   const client = new OffloadClient(null, {onState: (s) => console.log(s)});
 *   client.subscribe('room:general', (data, msg) => render(data, msg.id), {since: '0-0'});
 *   client.publish('staff:chat', {text: 'hi'}).then((id) => ..., (err) => err.code);
 *   client.rpc('orders.cancel', {id: 42}).then((result) => ..., (err) => err.code);
 *
 * Without the session cookie (docs/security.md, "Tokens"): pass `getToken`, an async
 * function that returns a fresh connection token from your server; it is called on every
 * (re)connect and before the token expires (the client reads `exp` from the token and
 * sends `refresh`). Private channels take a subscription token, or a function for one:
 *
 *   const client = new OffloadClient(null, {getToken: () => fetch('/token').then((r) => r.text())});
 *   client.subscribe('private:doc-1', render, {token: () => fetchSubscriptionToken('private:doc-1')});
 *
 * Presence (docs/presence.md), in a namespace that keeps it: the client keeps the channel's
 * member list up to date (join/leave events, and a fresh read of the whole list after every
 * (re)subscribe and every `reset`), and calls onMembers with it whenever it changes:
 *
 *   client.subscribe('room:general', render, {onMembers: (m) => show(m.count, m.members)});
 *   client.members('room:general');  // {count, members: [{id, user, name, ...}], complete, ...}
 *   client.queryMembers('room:general', {limit: 100}).then((page) => page.next);  // one page
 *
 * OffloadClient.EventStream is the same over Server-Sent Events, for where websockets cannot go.
 *
 * Guarantees: every subscription is restored after a reconnect, resuming after the
 * last id received, so no message is lost (as long as it is still in history) or
 * delivered twice.
 */
(function (global) {
  'use strict';

  /** Reconnect backoff: full jitter, base 500 ms, factor 2, capped at 15 s. */
  const BACKOFF_BASE = 500;
  const BACKOFF_FACTOR = 2;
  const BACKOFF_MAX = 15000;
  /** A connection that stayed open this long resets the backoff. */
  const STABLE_AFTER = 5000;
  /** Close codes meaning "server shutting down / restarting": reconnect quickly. */
  const RESTART_CODES = [1001, 1012];
  /** Quick reconnect delay window for RESTART_CODES (always < 1 s). */
  const RESTART_DELAY_MIN = 100;
  const RESTART_DELAY_SPREAD = 650;
  /** Close code of a socket whose user logged out (or lost the session otherwise): do not reconnect. */
  const CLOSE_SESSION_ENDED = 4001;
  /** Close code of a socket whose connection token expired: reconnect at once with a fresh one (getToken). */
  const CLOSE_TOKEN_EXPIRED = 4003;
  /** Close code used when the client itself gives up on a dead socket. */
  const CLOSE_CLIENT_TIMEOUT = 4000;
  /** `since` value meaning "everything still retained". */
  const ZERO_ID = '0-0';

  const DEFAULTS = {
    onState: null,        // (state, previousState) => void
    onSubscribed: null,   // (channel, reply, info) => void
    onError: null,        // (errorReply) => void
    onMessage: null,      // (msg) => void, every delivered `message` envelope
    debug: false,
    autoConnect: true,
    heartbeat: 25000,       // ms without traffic before an application ping (0 = off)
    heartbeatTimeout: 10000, // ms to wait for any traffic after that ping
    connectTimeout: 10000,   // ms allowed for the websocket handshake
    requestTimeout: 10000,   // ms to wait for a `pong` (or `refreshed`) reply
    rpcTimeout: 15000,       // ms to wait for a `reply` or `published` (server: OFFLOAD_RPC_TIMEOUT, 10 s)
    liveTimeout: 5000,       // ms to wait for subscription replies before 'live' anyway
    token: null,             // a connection token (replaces the session cookie); see getToken
    getToken: null,          // async () => a fresh connection token: on every (re)connect and to refresh
    refreshBefore: 30000,    // ms before the token's expiry to refresh it (at most half its life)
    onPresence: null,        // (channel, event) => void, every `presence` event of every channel
    membersPage: 1000,       // members per page when a member list is read (server cap: OFFLOAD_PRESENCE_PAGE_SIZE)
    membersMax: 1000,        // members a kept list holds at most (beyond: `truncated`; the count stays exact)
    presenceJitter: 1000,    // ms: a re-read that every subscriber makes at once (after a `reset`, or a
                             // resubscribe after a reload) is spread over this, plus presenceJitterPerMember
    presenceJitterPerMember: 2,  // ms per member (of the last count), up to 30 s: a big channel's clients
                                 // do not all page through it in the same second
    presenceVerify: 3000,    // ms a kept list may differ in size from the server's count before it is re-read
  };

  // ---------------------------------------------------------------- ids

  /** Compares two non-negative decimal integer strings exactly (any length). */
  function compareDigits(a, b) {
    a = a.replace(/^0+(?=\d)/, '');
    b = b.replace(/^0+(?=\d)/, '');
    if (a.length !== b.length) return a.length < b.length ? -1 : 1;
    return a === b ? 0 : (a < b ? -1 : 1);
  }

  /** Splits an id `ms-seq` into its two digit strings, or null if it is not an id. */
  function splitId(id) {
    const m = typeof id === 'string' ? /^(\d+)-(\d+)$/.exec(id) : null;
    return m ? [m[1], m[2]] : null;
  }

  /**
   * Compares two message ids as pairs of integers.
   * @returns {number} -1, 0 or 1; NaN if either is not a valid id.
   */
  function compareIds(a, b) {
    const x = splitId(a);
    const y = splitId(b);
    if (!x || !y) return NaN;
    return compareDigits(x[0], y[0]) || compareDigits(x[1], y[1]);
  }

  // ---------------------------------------------------------------- helpers

  /** Resolves `url` (absolute, relative, http(s) or ws(s)) to a ws(s) URL. */
  function resolveUrl(url) {
    const loc = global.location;
    if (url == null || url === '') {
      if (!loc) throw new TypeError('OffloadClient: a url is required outside a browser');
      return (loc.protocol === 'https:' ? 'wss://' : 'ws://') + loc.host + '/ws/';
    }
    url = String(url);
    if (!loc || typeof URL !== 'function') return url;
    const u = new URL(url, loc.href);
    if (u.protocol === 'http:') u.protocol = 'ws:';
    else if (u.protocol === 'https:') u.protocol = 'wss:';
    return u.href;
  }

  /** Adds `name=value` to a URL's query string. */
  function withParam(url, name, value) {
    return url + (url.indexOf('?') === -1 ? '?' : '&') + name + '=' + encodeURIComponent(value);
  }

  /**
   * When a token (offload.tokens: `<base64url JSON payload>.<signature>`) expires,
   * in ms since the epoch, from its payload's `exp`; null if it cannot be read.
   */
  function tokenExpiry(token) {
    if (typeof token !== 'string' || typeof atob !== 'function') return null;
    try {
      let b64 = token.split('.')[0].replace(/-/g, '+').replace(/_/g, '/');
      while (b64.length % 4) b64 += '=';
      const exp = JSON.parse(atob(b64)).exp;
      return typeof exp === 'number' ? exp * 1000 : null;
    } catch (e) {
      return null;
    }
  }

  /** Calls `fn()` (a token getter: sync or async) and always returns a promise. */
  function fetchToken(fn, ...args) {
    return new Promise((resolve) => resolve(fn(...args)));
  }

  /** Error used to reject publish() / ping(); mirrors the server's `error` reply. */
  class OffloadError extends Error {
    constructor(reply) {
      super(reply.reason || reply.code || 'offload error');
      this.name = 'OffloadError';
      this.type = 'error';
      this.code = reply.code;
      this.reason = reply.reason;
      if (reply.channel !== undefined) this.channel = reply.channel;
      if (reply.ref !== undefined) this.ref = reply.ref;
      this.reply = reply;
    }
  }

  /** Calls a user callback; an exception is rethrown asynchronously, not swallowed. */
  function safeCall(fn, ...args) {
    if (typeof fn !== 'function') return;
    try {
      fn(...args);
    } catch (err) {
      setTimeout(() => { throw err; }, 0);
    }
  }

  const defer = typeof queueMicrotask === 'function'
    ? queueMicrotask
    : (fn) => Promise.resolve().then(fn);

  // ---------------------------------------------------------------- client

  /**
   * Websocket client with automatic reconnect and gap-free resubscription.
   * States: 'connecting' (first attempt), 'live' (open, subscriptions confirmed),
   * 'reconnecting' (lost, retrying), 'closed' (after close()).
   */
  class OffloadClient {
    /**
     * @param {string} [url] websocket URL; defaults to ws(s)://<this host>/ws/
     * @param {object} [options] see DEFAULTS
     */
    constructor(url, options) {
      this.url = resolveUrl(url);
      this.options = Object.assign({}, DEFAULTS, options || {});
      /** Counters: connects (opens), reconnects (opens after the first), attempts, messages, dropped. */
      this.stats = {
        connects: 0, reconnects: 0, attempts: 0,
        messages: 0, dropped: 0, lastCloseCode: null,
      };
      this._state = null;
      this._closed = !this.options.autoConnect;
      this._ws = null;
      this._openedAt = null;
      this._lastRecv = 0;
      this._attempt = 0;          // consecutive failures, drives the backoff
      this._subs = new Map();     // channel -> subscription record
      this._pending = new Map();  // ref -> {kind, resolve, reject, timer, cmd, sent}
      this._outbox = [];          // refs of publishes waiting for a connection
      this._refSeq = 0;
      this._awaiting = null;      // channels whose reply gates 'live'
      this._timers = {reconnect: null, connect: null, live: null, heartbeat: null, refresh: null};
      this._token = null;         // the connection token of the current socket
      this._opening = null;       // the attempt waiting for getToken()
      this._probing = false;
      this._listening = false;
      this._onOnline = this._onOnline.bind(this);
      if (!this._closed) defer(() => { if (!this._closed && !this._ws) this.connect(); });
    }

    /** Current connection state. */
    get state() {
      return this._state || (this._closed ? 'closed' : 'connecting');
    }

    /** True when the websocket is open. */
    get connected() {
      return !!this._ws && this._ws.readyState === 1;
    }

    /** Last message id seen on `channel` (or the subscription start), or null. */
    lastId(channel) {
      const sub = this._subs.get(channel);
      return sub ? sub.lastId : null;
    }

    /** Channels currently registered. */
    get channels() {
      return Array.from(this._subs.keys());
    }

    /** Opens the connection (automatic unless autoConnect: false); re-enables reconnects after close(). */
    connect() {
      this._closed = false;
      this._listen(true);
      if (this._ws || this._opening) return this;
      this._clearTimer('reconnect');
      this._open();
      return this;
    }

    /** Closes the connection for good: no reconnect until connect() is called again. */
    close(code, reason) {
      this._closed = true;
      this._opening = null;
      this._clearTimer('connect');
      this._listen(false);
      this._clearTimer('reconnect');
      const ws = this._ws;
      if (ws) {
        this._detach(ws);
        try { ws.close(code || 1000, reason || ''); } catch (e) { /* already closing */ }
        this._handleClose(code || 1000, reason || 'client close');
      } else {
        this._setState('closed');
      }
      for (const ref of Array.from(this._pending.keys())) {
        this._settle(ref, new OffloadError({code: 'closed', reason: 'client closed'}));
      }
      this._outbox = [];
    }

    /**
     * Subscribes to `channel`; handler(data, msg) gets every `message` of it.
     * Subscribing again to the same channel replaces the handler.
     * @param {string} channel
     * @param {function(*, object)} handler
     * @param {{since?: string, onSubscribed?: function, token?: (string|function)}} [opts] since: start
     *   after this id ('0-0' = all retained history); onSubscribed(reply, info) for this channel only;
     *   token: the subscription token of a private channel, or a function (channel) => token or
     *   a promise of one, called for every subscribe (a resubscribe after a reconnect needs a valid one).
     *   Presence (a namespace with "presence": True): onPresence(event, members) gets every `presence`
     *   event of this channel; onMembers(members) the kept member list (see members()) whenever it
     *   changed; presence: true keeps the list without either. Any of the three keeps it.
     * @returns {function} a function that unsubscribes
     */
    subscribe(channel, handler, opts) {
      if (typeof channel !== 'string' || !channel) throw new TypeError('channel must be a non-empty string');
      opts = opts || {};
      let sub = this._subs.get(channel);
      const created = !sub;
      if (sub) {
        sub.handler = handler;
        if (opts.onSubscribed) sub.onSubscribed = opts.onSubscribed;
        if (opts.token != null) sub.token = opts.token;
        if (opts.onPresence) sub.onPresence = opts.onPresence;
        if (opts.onMembers) sub.onMembers = opts.onMembers;
      } else {
        sub = {
          channel,
          handler,
          since: opts.since != null ? String(opts.since) : null,
          onSubscribed: opts.onSubscribed || null,
          token: opts.token != null ? opts.token : null,
          onPresence: opts.onPresence || null,
          onMembers: opts.onMembers || null,
          presence: null,    // the kept member list (see _track)
          lastId: null,      // newest id delivered (or subscription start)
          confirmed: false,  // got at least one `subscribed` reply
          active: false,     // subscribed on the current connection
          ref: null,
          sentSince: null,
          retryTimer: null,
        };
        this._subs.set(channel, sub);
      }
      if (!sub.presence && (opts.presence || opts.onPresence || opts.onMembers)) {
        this._track(sub);
        if (sub.active) this._relist(sub, 0);
      }
      if (created && this.connected) this._sendSubscribe(sub);
      return () => this.unsubscribe(channel);
    }

    /** Stops receiving `channel`. Returns false if it was not subscribed. */
    unsubscribe(channel) {
      const sub = this._subs.get(channel);
      if (!sub) return false;
      clearTimeout(sub.retryTimer);
      this._untrack(sub);
      this._subs.delete(channel);
      if (this.connected) this._send({type: 'unsubscribe', channel, ref: this._nextRef()});
      this._settleAwaiting(channel);
      return true;
    }

    /**
     * Publishes `data` to `channel` (only where the namespace allows client publishing).
     * Queued while disconnected. Rejects with an OffloadError (code from the server: the
     * namespace's publish hook may refuse with its own, or 'timeout', 'disconnected', 'closed').
     * @param {{timeout?: number}} [opts] ms to wait (default options.rpcTimeout: a hook may run)
     * @returns {Promise<string>} the message id
     */
    publish(channel, data, opts) {
      const timeout = (opts && opts.timeout) || this.options.rpcTimeout;
      return this._request('publish', {type: 'publish', channel, data}, timeout, true);
    }

    /**
     * Calls the server-side method `method` (`@offload.rpc` in Python) with `data`.
     * Queued while disconnected, like publish(). Rejects with an OffloadError whose `code`
     * is the server's ('method_not_found', 'rate_limited', 'too_many_calls', 'rpc_timeout',
     * 'internal_error', or the method's own `offload.Rejected` code) or 'timeout',
     * 'disconnected', 'closed'.
     * @param {string} method
     * @param {*} [data] any JSON value
     * @param {{timeout?: number}} [opts] ms to wait (default options.rpcTimeout)
     * @returns {Promise<*>} what the method returned
     */
    rpc(method, data, opts) {
      if (typeof method !== 'string' || !method) throw new TypeError('method must be a non-empty string');
      const timeout = (opts && opts.timeout) || this.options.rpcTimeout;
      const cmd = {type: 'rpc', method};
      if (data !== undefined) cmd.data = data;
      return this._request('rpc', cmd, timeout, true);
    }

    /** Application-level ping. @returns {Promise<number>} round trip in ms */
    ping() {
      const started = Date.now();
      return this._request('ping', {type: 'ping'}, this.options.requestTimeout, false)
        .then(() => Date.now() - started);
    }

    /**
     * The kept member list of `channel` (a subscription with presence, see subscribe()), or null.
     * `members` are the members' infos ({id, user, name, ...the namespace's presence_info}) in id
     * order; `count` is the server's member count as last heard (exact even when the list is
     * truncated); `complete` is false until the list was read on the current connection (and
     * while the connection is down: events may be missed then); `truncated`: the list stopped
     * at options.membersMax members.
     * @returns {{channel: string, count: (number|null), members: object[], complete: boolean,
     *   truncated: boolean}|null}
     */
    members(channel) {
      const sub = this._subs.get(channel);
      const p = sub && sub.presence;
      if (!p) return null;
      const ids = Array.from(p.byId.keys()).sort();
      return {
        channel,
        count: p.count,
        members: ids.map((id) => p.byId.get(id)),
        complete: p.complete,
        truncated: p.truncated,
      };
    }

    /**
     * One page of a presence channel's members (the `members` command): of a channel this client
     * is subscribed to, or may subscribe to. Queued while disconnected, like publish(). Rejects
     * with an OffloadError ('presence_disabled', 'forbidden', 'unavailable', 'timeout', ...).
     * @param {string} channel
     * @param {{after?: string, limit?: number, timeout?: number}} [opts] after: the previous page's
     *   `next`; limit: members per page (server default 100, capped by OFFLOAD_PRESENCE_PAGE_SIZE;
     *   0 for the count only)
     * @returns {Promise<{channel: string, count: number, members: object[], next: (string|null)}>}
     */
    queryMembers(channel, opts) {
      opts = opts || {};
      const cmd = {type: 'members', channel};
      if (opts.after != null) cmd.after = String(opts.after);
      if (opts.limit != null) cmd.limit = opts.limit;
      return this._request('members', cmd, opts.timeout || this.options.requestTimeout, true)
        .then((reply) => ({channel: reply.channel, count: reply.count, members: reply.members || [], next: reply.next}));
    }

    // ------------------------------------------------------------ connection

    _open() {
      const first = this.stats.attempts === 0;
      this.stats.attempts++;
      this._setState(first ? 'connecting' : 'reconnecting');
      if (typeof this.options.getToken !== 'function') {
        this._dial(this.options.token);
        return;
      }
      const attempt = this._opening = {};
      const failed = (why) => {
        if (this._opening !== attempt) return;
        this._opening = null;
        this._log('no connection token:', why);
        if (!this._closed) this._scheduleReconnect(null, false);
      };
      this._setTimer('connect', this.options.connectTimeout, () => failed('getToken timed out'));
      fetchToken(this.options.getToken).then((token) => {
        if (this._opening !== attempt) return;
        this._opening = null;
        this._clearTimer('connect');
        if (!this._closed) this._dial(token);
      }, failed);
    }

    /** Opens the websocket, with `token` (a connection token) if there is one. */
    _dial(token) {
      this._token = token || null;
      let ws;
      try {
        ws = new WebSocket(token ? withParam(this.url, 'token', token) : this.url);
      } catch (err) {
        this._log('cannot create websocket', err);
        this._scheduleReconnect(null, false);
        return;
      }
      this._ws = ws;
      ws.onopen = () => { if (ws === this._ws) this._handleOpen(); };
      ws.onmessage = (ev) => { if (ws === this._ws) this._handleMessage(ev); };
      ws.onclose = (ev) => { if (ws === this._ws) this._handleClose(ev.code, ev.reason); };
      ws.onerror = () => { this._log('websocket error'); };
      this._setTimer('connect', this.options.connectTimeout, () => {
        if (ws === this._ws && ws.readyState !== 1) this._drop('connect timeout');
      });
    }

    _handleOpen() {
      this._clearTimer('connect');
      this._openedAt = Date.now();
      this._lastRecv = this._openedAt;
      this.stats.connects++;
      if (this.stats.connects > 1) this.stats.reconnects++;
      this._log('open', this.url);
      this._awaiting = new Set();
      for (const sub of this._subs.values()) {
        this._sendSubscribe(sub);
        this._awaiting.add(sub.channel);
      }
      for (const ref of this._outbox.splice(0)) {
        const p = this._pending.get(ref);
        if (p && !p.sent) {
          p.sent = true;
          this._send(p.cmd);
        }
      }
      if (this._awaiting.size === 0) this._goLive();
      else this._setTimer('live', this.options.liveTimeout, () => this._goLive());
      this._startHeartbeat();
      this._scheduleRefresh();
    }

    // ------------------------------------------------------------ token refresh

    /** Refreshes the connection token ahead of its expiry (only with getToken). */
    _scheduleRefresh() {
      this._clearTimer('refresh');
      const expires = tokenExpiry(this._token);
      if (expires == null || typeof this.options.getToken !== 'function') return;
      const left = expires - Date.now();
      const lead = Math.min(this.options.refreshBefore, left / 2);
      this._setTimer('refresh', Math.max(0, left - lead), () => this._refresh());
    }

    /** Sends `refresh` with a fresh token; on failure retries until the server closes with 4003. */
    _refresh() {
      const ws = this._ws;
      if (!this.connected) return;
      let token;
      fetchToken(this.options.getToken)
        .then((fresh) => {
          token = fresh;
          if (ws !== this._ws) return null;
          return this._request('refresh', {type: 'refresh', token}, this.options.requestTimeout, false);
        })
        .then((expires) => {
          if (ws !== this._ws || expires == null) return;
          this._log('token refreshed until', expires);
          this._token = token;
          this._scheduleRefresh();
        })
        .catch((err) => {
          this._log('token refresh failed', err);
          if (ws === this._ws) this._setTimer('refresh', 1000 + Math.random() * 1000, () => this._refresh());
        });
    }

    _goLive() {
      this._awaiting = null;
      this._clearTimer('live');
      if (this.connected) this._setState('live');
    }

    _settleAwaiting(channel) {
      if (this._awaiting && this._awaiting.delete(channel) && this._awaiting.size === 0) this._goLive();
    }

    /** Common close path, for server closes and for sockets the client gave up on. */
    _handleClose(code, reason) {
      const openedFor = this._openedAt != null ? Date.now() - this._openedAt : -1;
      this._ws = null;
      this._openedAt = null;
      this._awaiting = null;
      this._probing = false;
      this._clearTimer('connect');
      this._clearTimer('live');
      this._clearTimer('heartbeat');
      this._clearTimer('refresh');
      this.stats.lastCloseCode = code;
      this._log('closed', code, reason || '');
      for (const sub of this._subs.values()) {
        sub.active = false;
        clearTimeout(sub.retryTimer);
        if (sub.presence) this._presenceLost(sub);
      }
      // Requests already sent have an unknown outcome: fail them. Unsent ones stay queued.
      for (const [ref, p] of Array.from(this._pending)) {
        if (p.sent || !p.queue) this._settle(ref, new OffloadError({code: 'disconnected', reason: 'connection lost'}));
      }
      if (code === CLOSE_SESSION_ENDED) this._closed = true;  // a new session means a new page
      // An expired token without a way to get another: reconnecting would be refused.
      if (code === CLOSE_TOKEN_EXPIRED && typeof this.options.getToken !== 'function') this._closed = true;
      if (this._closed) {
        this._setState('closed');
        return;
      }
      if (openedFor >= STABLE_AFTER) this._attempt = 0;
      this._scheduleReconnect(code, openedFor >= 0);
    }

    _scheduleReconnect(code, wasOpen) {
      let delay;
      if (wasOpen && (RESTART_CODES.indexOf(code) !== -1 || code === CLOSE_TOKEN_EXPIRED)) {
        delay = RESTART_DELAY_MIN + Math.random() * RESTART_DELAY_SPREAD;
      } else {
        const ceiling = Math.min(BACKOFF_MAX, BACKOFF_BASE * Math.pow(BACKOFF_FACTOR, Math.min(this._attempt, 30)));
        delay = Math.random() * ceiling;
        this._attempt++;
      }
      this._setState('reconnecting');
      this._log('reconnect in', Math.round(delay), 'ms');
      this._setTimer('reconnect', delay, () => {
        if (!this._closed && !this._ws && !this._opening) this._open();
      });
    }

    /** Abandons the current socket (no close handshake wait) and reconnects. */
    _drop(reason) {
      const ws = this._ws;
      if (!ws) return;
      this._detach(ws);
      try { ws.close(CLOSE_CLIENT_TIMEOUT, reason); } catch (e) { /* ignore */ }
      this._handleClose(CLOSE_CLIENT_TIMEOUT, reason);
    }

    _detach(ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    }

    _listen(on) {
      if (on === this._listening || typeof global.addEventListener !== 'function') return;
      this._listening = on;
      if (on) global.addEventListener('online', this._onOnline);
      else global.removeEventListener('online', this._onOnline);
    }

    /** Browser back online: retry now, or check that an open socket still works. */
    _onOnline() {
      if (this._closed) return;
      this._log('browser online');
      if (this.connected) {
        this._probe();
      } else if (!this._ws && !this._opening) {
        this._clearTimer('reconnect');
        this._attempt = 0;
        this._open();
      }
    }

    // ------------------------------------------------------------ heartbeat

    _startHeartbeat() {
      const every = this.options.heartbeat;
      if (!every) return;
      const tick = () => {
        if (!this.connected) return;
        if (!this._probing && Date.now() - this._lastRecv >= every) this._probe();
        this._setTimer('heartbeat', Math.min(every, 5000), tick);
      };
      this._setTimer('heartbeat', Math.min(every, 5000), tick);
    }

    /** Sends a ping; if nothing at all arrives within heartbeatTimeout, reconnects. */
    _probe() {
      const ws = this._ws;
      if (this._probing || !this.connected) return;
      this._probing = true;
      const sentAt = Date.now();
      this._request('ping', {type: 'ping'}, this.options.heartbeatTimeout, false).then(
        () => { this._probing = false; },
        () => {
          this._probing = false;
          if (ws === this._ws && this._lastRecv < sentAt) this._drop('heartbeat timeout');
        },
      );
    }

    // ------------------------------------------------------------ incoming

    _handleMessage(ev) {
      this._lastRecv = Date.now();
      if (typeof ev.data !== 'string') {
        this._log('ignoring binary frame');
        return;
      }
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (e) {
        this._log('ignoring invalid JSON', ev.data);
        return;
      }
      if (!msg || typeof msg !== 'object') return;
      switch (msg.type) {
        case 'message': this._onChannelMessage(msg); break;
        case 'subscribed': this._onSubscribed(msg); break;
        case 'published': this._onReply(msg, msg.id); break;
        case 'reply': this._onReply(msg, msg.data); break;
        case 'refreshed': this._onReply(msg, msg.expires); break;
        case 'members': this._onReply(msg, msg); break;
        case 'presence': this._onPresence(msg); break;
        case 'pong': this._onPong(msg); break;
        case 'error': this._onError(msg); break;
        case 'unsubscribed': this._log('unsubscribed', msg.channel); break;
        default: this._log('ignoring message type', msg.type);
      }
    }

    _onChannelMessage(msg) {
      const sub = this._subs.get(msg.channel);
      if (!sub) return;
      if (sub.lastId != null && compareIds(msg.id, sub.lastId) <= 0) {
        this.stats.dropped++;
        this._log('dropping duplicate', msg.channel, msg.id, '<=', sub.lastId);
        return;
      }
      if (splitId(msg.id)) sub.lastId = msg.id;
      this.stats.messages++;
      safeCall(sub.handler, msg.data, msg);
      safeCall(this.options.onMessage, msg);
    }

    _onSubscribed(msg) {
      const sub = this._subs.get(msg.channel);
      this._settleAwaiting(msg.channel);
      if (!sub) return;
      if (msg.ref != null && sub.ref != null && msg.ref !== sub.ref) return; // stale reply
      sub.active = true;
      sub.confirmed = true;
      if (msg.last_id != null && (sub.lastId == null || compareIds(msg.last_id, sub.lastId) > 0)) {
        sub.lastId = msg.last_id;
      }
      const since = sub.sentSince;
      // Our subscribes always carry a ref; a reply without one is the server
      // re-syncing an existing subscription (e.g. after a Redis outage).
      const resync = msg.ref == null;
      const info = {
        since,
        resumed: sub.resumed,
        resync,
        // true when messages we should have had may be gone ('0-0' asked for
        // "whatever is retained", so nothing is missing from our point of view)
        gap: msg.recovered === false && (resync || (since != null && since !== ZERO_ID)),
      };
      this._log('subscribed', msg.channel, msg);
      // Presence events were missed before this (or may have been, on a resync): read the list again;
      // a resubscribe (a count is known: a reconnect, maybe every client's after a reload) spreads it.
      if (sub.presence) this._relist(sub, sub.presence.count == null ? 0 : this._spread(sub.presence));
      safeCall(sub.onSubscribed, msg, info);
      safeCall(this.options.onSubscribed, msg.channel, msg, info);
    }

    _onPong(msg) {
      if (msg.ref != null && this._pending.has(msg.ref)) {
        this._onReply(msg, msg);
        return;
      }
      for (const [ref, p] of this._pending) { // pong without ref: oldest ping
        if (p.kind === 'ping') {
          this._settle(ref, null, msg);
          return;
        }
      }
    }

    _onReply(msg, value) {
      if (msg.ref != null && this._pending.has(msg.ref)) this._settle(msg.ref, null, value);
    }

    _onError(msg) {
      this._log('error', msg);
      if (msg.ref != null && this._pending.has(msg.ref)) {
        this._settle(msg.ref, new OffloadError(msg));
        safeCall(this.options.onError, msg);
        return;
      }
      let sub = null;
      for (const s of this._subs.values()) {
        if (msg.ref != null ? s.ref === msg.ref : (s.channel === msg.channel && !s.active)) {
          sub = s;
          break;
        }
      }
      if (sub) {
        this._settleAwaiting(sub.channel);
        if (msg.code === 'invalid_since' && sub.sentSince != null) {
          // Fall back to a live-only subscription rather than none.
          sub.since = null;
          sub.lastId = null;
          this._sendSubscribe(sub, true);
          return;
        }
        if (msg.code === 'unavailable') {
          clearTimeout(sub.retryTimer);
          sub.retryTimer = setTimeout(() => {
            if (this._subs.get(sub.channel) === sub && this.connected && !sub.active) this._sendSubscribe(sub);
          }, 1000 + Math.random() * 2000);
        }
      }
      safeCall(this.options.onError, msg);
    }

    // ------------------------------------------------------------ presence
    //
    // A kept list converges to the server's: it is read whole (page by page) after every
    // `subscribed` (a reconnect may have missed events) and after every `reset` (a storm the
    // server did not list); events that arrive while it is read are applied to the old list at
    // once and again to the new one (joins and leaves are idempotent). A list whose size still
    // differs from the server's count presenceVerify ms later (events of two workers may arrive
    // in another order than their changes) is read again, with a backoff.

    _track(sub) {
      sub.presence = {
        byId: new Map(),    // member id -> info
        count: null,        // the server's count, from the newest event or page
        complete: false,
        truncated: false,
        gen: 0,             // the current read; an older one's pages are ignored
        buffer: null,       // events received during the current read
        timer: null,        // the next read (a reset's jitter, a retry)
        verify: null,       // the count check
        verifyDelay: this.options.presenceVerify,
      };
    }

    _untrack(sub) {
      const p = sub.presence;
      if (!p) return;
      clearTimeout(p.timer);
      clearTimeout(p.verify);
      sub.presence = null;
    }

    /** The connection is gone: events will be missed until the list is read again. */
    _presenceLost(sub) {
      const p = sub.presence;
      clearTimeout(p.timer);
      clearTimeout(p.verify);
      p.verify = null;
      p.gen++;
      p.buffer = null;
      if (p.complete) {
        p.complete = false;
        this._membersChanged(sub);
      }
    }

    _onPresence(msg) {
      const sub = this._subs.get(msg.channel);
      safeCall(this.options.onPresence, msg.channel, msg);
      if (!sub) return;
      const p = sub.presence;
      if (p) {
        if (typeof msg.count === 'number') p.count = msg.count;
        if (msg.reset) {
          this._relist(sub, this._spread(p));
        } else {
          if (p.buffer) p.buffer.push(msg);
          this._applyPresence(p, msg);
          this._checkCount(sub);
        }
      }
      safeCall(sub.onPresence, msg, p ? this.members(sub.channel) : null);
      if (p && !msg.reset) this._membersChanged(sub);
    }

    _applyPresence(p, event) {
      for (const id of event.leaves || []) p.byId.delete(String(id));
      for (const info of event.joins || []) {
        if (!info || info.id == null) continue;
        const id = String(info.id);
        if (p.byId.has(id) || p.byId.size < this.options.membersMax) p.byId.set(id, info);
        else p.truncated = true;
      }
    }

    /** A random delay for a re-read that every subscriber of the channel makes at once: longer for big channels. */
    _spread(p) {
      const o = this.options;
      return Math.random() * Math.min(30000, o.presenceJitter + (p.count || 0) * o.presenceJitterPerMember);
    }

    /** Reads the whole member list again after `delay` ms, page by page, and replaces the kept one. */
    _relist(sub, delay) {
      const p = sub.presence;
      clearTimeout(p.timer);
      const gen = ++p.gen;
      p.buffer = null;
      const current = () => this._subs.get(sub.channel) === sub && sub.presence === p && p.gen === gen;
      const read = () => {
        if (!current() || !sub.active || !this.connected) return; // the next `subscribed` reads it
        p.buffer = [];
        const byId = new Map();
        const page = (after) => {
          const cmd = {type: 'members', channel: sub.channel, limit: this.options.membersPage};
          if (after != null) cmd.after = after;
          this._request('members', cmd, this.options.requestTimeout, false).then((reply) => {
            if (!current()) return;
            if (typeof reply.count === 'number') p.count = reply.count;
            for (const info of reply.members || []) {
              if (info && info.id != null && byId.size < this.options.membersMax) byId.set(String(info.id), info);
            }
            if (reply.next != null && byId.size < this.options.membersMax) page(reply.next);
            else this._listed(sub, byId, reply.next != null);
          }, (err) => {
            if (!current()) return;
            p.buffer = null;
            this._log('member list not read', sub.channel, err.code);
            // Lost connection: the resubscribe reads it. Refused (presence_disabled, forbidden): stop.
            if (['timeout', 'unavailable', 'internal'].indexOf(err.code) !== -1) {
              p.timer = setTimeout(() => { if (current()) read(); }, 1000 + Math.random() * 2000);
            }
          });
        };
        page(null);
      };
      if (delay > 0) p.timer = setTimeout(read, delay);
      else read();
    }

    _listed(sub, byId, truncated) {
      const p = sub.presence;
      const missed = p.buffer || [];
      p.byId = byId;
      p.buffer = null;
      p.truncated = truncated;
      for (const event of missed) this._applyPresence(p, event);
      p.complete = true;
      this._checkCount(sub);
      this._membersChanged(sub);
    }

    /** A complete list whose size stays off the server's count is read again (with a backoff). */
    _checkCount(sub) {
      const p = sub.presence;
      if (!p.complete || p.truncated || p.buffer || p.count == null || !this.options.presenceVerify) return;
      if (p.byId.size === p.count) {
        clearTimeout(p.verify);
        p.verify = null;
        p.verifyDelay = this.options.presenceVerify;
        return;
      }
      if (p.verify) return;
      p.verify = setTimeout(() => {
        p.verify = null;
        if (sub.presence !== p || !p.complete || p.buffer || p.byId.size === p.count) return;
        this._log('member list off the count: reading it again', sub.channel, p.byId.size, p.count);
        p.verifyDelay = Math.min(p.verifyDelay * 2, 60000);
        this._relist(sub, 0);
      }, p.verifyDelay);
    }

    _membersChanged(sub) {
      if (sub.onMembers) safeCall(sub.onMembers, this.members(sub.channel));
    }

    // ------------------------------------------------------------ outgoing

    /** Sends subscribe, resuming after the last id seen (or all history if the channel was empty). */
    _sendSubscribe(sub, noSince) {
      let since = null;
      if (!noSince) {
        if (sub.lastId != null) since = sub.lastId;
        else if (sub.confirmed) since = ZERO_ID; // channel had no history when we joined
        else since = sub.since;
      }
      sub.active = false;
      sub.ref = this._nextRef();
      sub.sentSince = since;
      sub.resumed = sub.confirmed;
      const cmd = {type: 'subscribe', channel: sub.channel, ref: sub.ref};
      if (since != null) cmd.since = since;
      if (typeof sub.token !== 'function') {
        if (sub.token != null) cmd.token = String(sub.token);
        this._send(cmd);
        return;
      }
      const ws = this._ws;
      const ref = sub.ref;
      const current = () => ws === this._ws && sub.ref === ref && this._subs.get(sub.channel) === sub;
      fetchToken(sub.token, sub.channel).then((token) => {
        if (!current()) return;
        cmd.token = String(token);
        this._send(cmd);
      }, (err) => {
        if (!current()) return;
        this._settleAwaiting(sub.channel);
        safeCall(this.options.onError, {type: 'error', code: 'token_unavailable', reason: String(err), channel: sub.channel});
      });
    }

    _request(kind, cmd, timeout, queue) {
      return new Promise((resolve, reject) => {
        if (this._closed) {
          reject(new OffloadError({code: 'closed', reason: 'client closed'}));
          return;
        }
        if (!queue && !this.connected) {
          reject(new OffloadError({code: 'disconnected', reason: 'not connected'}));
          return;
        }
        const ref = this._nextRef();
        cmd.ref = ref;
        const p = {kind, cmd, resolve, reject, queue, sent: false, timer: null};
        this._pending.set(ref, p);
        p.timer = setTimeout(() => {
          this._settle(ref, new OffloadError({code: 'timeout', reason: kind + ' timed out'}));
        }, timeout);
        if (this.connected) {
          p.sent = true;
          this._send(cmd);
        } else {
          this._outbox.push(ref);
        }
      });
    }

    _settle(ref, error, value) {
      const p = this._pending.get(ref);
      if (!p) return;
      this._pending.delete(ref);
      clearTimeout(p.timer);
      const i = this._outbox.indexOf(ref);
      if (i !== -1) this._outbox.splice(i, 1);
      if (error) p.reject(error);
      else p.resolve(value);
    }

    _send(obj) {
      if (!this.connected) return false;
      this._ws.send(JSON.stringify(obj));
      return true;
    }

    _nextRef() {
      this._refSeq += 1;
      return 'r' + this._refSeq;
    }

    // ------------------------------------------------------------ misc

    _setState(state) {
      const prev = this._state;
      if (prev === state) return;
      this._state = state;
      this._log('state', state);
      safeCall(this.options.onState, state, prev);
    }

    _setTimer(name, ms, fn) {
      clearTimeout(this._timers[name]);
      this._timers[name] = setTimeout(() => {
        this._timers[name] = null;
        fn();
      }, ms);
    }

    _clearTimer(name) {
      clearTimeout(this._timers[name]);
      this._timers[name] = null;
    }

    _log(...args) {
      if (this.options.debug && global.console) global.console.debug('[offload]', ...args);
    }
  }

  // ---------------------------------------------------------------- event stream

  /**
   * The channels over Server-Sent Events (GET /sse/), for where websockets cannot go.
   * It reconnects by itself and resumes after the last event id. With getToken, every
   * connection asks for a fresh connection token: an EventSource cannot refresh one in
   * place, so when the server ends the stream with the `error` event `token_expired`
   * (or the connection drops) it reconnects with a new token and `last_event_id`.
   *
   *   const stream = new OffloadClient.EventStream('/sse/', {
   *     channels: ['public:news'], subTokens: () => fetchTokens(), getToken, onMessage: (data, msg) => ...});
   */
  class OffloadEventStream {
    /**
     * @param {string} [url] the stream's URL (default '/sse/')
     * @param {object} [options] channels: names; subTokens: subscription tokens (each names its
     *   channel), or a function returning them (or a promise of them), called on every connect;
     *   token / getToken: as for OffloadClient; onMessage(data, msg), onSubscribed(channel, msg),
     *   onPresence(channel, event) (the `presence` events of presence channels; a stream cannot
     *   send `members`: read the list from a view with offload.presence()),
     *   onError(msg), onState(state); retry: ms before reconnecting (jittered).
     */
    constructor(url, options) {
      this.url = url || '/sse/';
      this.options = Object.assign({
        channels: [], subTokens: [], token: null, getToken: null,
        onMessage: null, onSubscribed: null, onPresence: null, onError: null, onState: null, retry: 2000,
      }, options || {});
      /** The resume cursor of the whole stream (every channel's position), sent back on reconnect. */
      this.lastEventId = null;
      this.stats = {connects: 0, messages: 0};
      this.state = 'connecting';
      this._es = null;
      this._attempt = null;
      this._timer = null;
      this._closed = false;
      this._open();
    }

    /** Ends the stream for good. */
    close() {
      this._closed = true;
      this._attempt = null;
      clearTimeout(this._timer);
      if (this._es) this._es.close();
      this._es = null;
      this._setState('closed');
    }

    _open() {
      const attempt = this._attempt = {};
      const o = this.options;
      const subTokens = typeof o.subTokens === 'function' ? fetchToken(o.subTokens) : Promise.resolve(o.subTokens);
      const token = typeof o.getToken === 'function' ? fetchToken(o.getToken) : Promise.resolve(o.token);
      Promise.all([token, subTokens]).then(([connectionToken, subscriptionTokens]) => {
        if (this._attempt !== attempt || this._closed) return;
        let url = this.url;
        for (const channel of o.channels || []) url = withParam(url, 'channel', channel);
        for (const sub of subscriptionTokens || []) url = withParam(url, 'sub_token', sub);
        if (connectionToken) url = withParam(url, 'token', connectionToken);
        if (this.lastEventId) url = withParam(url, 'last_event_id', this.lastEventId);
        this._listen(new EventSource(url));
      }, () => this._reopen());
    }

    _listen(es) {
      this._es = es;
      const track = (ev) => {
        if (ev.lastEventId) this.lastEventId = ev.lastEventId;
        return JSON.parse(ev.data);
      };
      es.onopen = () => {
        this.stats.connects++;
        this._setState('live');
      };
      es.addEventListener('message', (ev) => {
        const msg = track(ev);
        this.stats.messages++;
        safeCall(this.options.onMessage, msg.data, msg);
      });
      es.addEventListener('subscribed', (ev) => {
        const msg = track(ev);
        safeCall(this.options.onSubscribed, msg.channel, msg);
      });
      es.addEventListener('presence', (ev) => {
        const msg = track(ev);
        safeCall(this.options.onPresence, msg.channel, msg);
      });
      es.addEventListener('error', (ev) => {
        if (ev.data !== undefined) {  // the server's `error` event: the stream ends after it
          const msg = track(ev);
          const expired = msg.code === 'token_expired';
          if (!expired) safeCall(this.options.onError, msg);
          this._reopen(expired ? 100 * Math.random() : null);  // a fresh token at once
          return;
        }
        // The connection failed. EventSource retries by itself unless it gave up (a 401/403
        // answer), but with the token of its URL: with getToken, reconnect here instead.
        if (es.readyState === 2 || typeof this.options.getToken === 'function') this._reopen();
        else this._setState('reconnecting');
      });
    }

    _reopen(delay) {
      if (this._es) this._es.close();
      this._es = null;
      if (this._closed) return;
      this._attempt = null;
      this._setState('reconnecting');
      clearTimeout(this._timer);
      if (delay == null) delay = this.options.retry * (0.5 + Math.random());
      this._timer = setTimeout(() => { if (!this._closed) this._open(); }, delay);
    }

    _setState(state) {
      if (this.state === state) return;
      this.state = state;
      safeCall(this.options.onState, state);
    }
  }

  OffloadClient.EventStream = OffloadEventStream;
  OffloadClient.tokenExpiry = tokenExpiry;
  OffloadClient.compareIds = compareIds;
  OffloadClient.OffloadError = OffloadError;
  OffloadClient.ZERO_ID = ZERO_ID;

  global.OffloadClient = OffloadClient;
})(typeof window !== 'undefined' ? window : globalThis);
