/*
 * The operator page (offload/templates/offload/operator.html): every worker's figures, merged,
 * live over the library's own websocket (OffloadClient). Each worker publishes one message per
 * stats interval on the operator channel (offload/operator.py); this page keeps the newest of
 * each worker and redraws. Subscribing needs a subscription token, which only the staff-only
 * token view mints.
 */
(function () {
  'use strict';

  const $ = (selector) => document.querySelector(selector);
  const config = JSON.parse($('#operator-config').textContent);
  const interval = Math.max(0.5, Number(config.interval) || 2) * 1000;
  const STALE_AFTER = 3 * interval;    // a worker not heard from for this long is struck through
  const FORGET_AFTER = 15 * interval;  // and then removed (it died, or its instance went away)
  const MAX_CHANNELS = 25;
  const MAX_DROPS = 50;

  /** worker key (host:pid) -> {data, seen} */
  const workers = new Map();

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text != null) node.textContent = String(text);
    return node;
  }

  function row(cells) {
    const tr = document.createElement('tr');
    for (const [text, className] of cells) tr.appendChild(el('td', className || '', text));
    return tr;
  }

  function fmt(value, digits) {
    if (value == null || Number.isNaN(value)) return '–';
    return Number(value).toFixed(digits);
  }

  function replaceRows(tbody, rows, empty) {
    tbody.replaceChildren(...rows);
    $(empty).hidden = rows.length > 0;
  }

  function workerName(data) {
    return `${data.host} #${data.worker} (${data.pid})`;
  }

  // ------------------------------------------------------------ rendering

  function render() {
    const now = Date.now();
    for (const [key, entry] of workers) {
      if (now - entry.seen > FORGET_AFTER) workers.delete(key);
    }
    const live = [...workers.values()].filter((entry) => now - entry.seen <= STALE_AFTER);
    renderWorkers(now);
    renderTotals(live);
    renderChannels(live);
    renderDrops();
  }

  function renderWorkers(now) {
    const entries = [...workers.values()].sort((a, b) =>
      a.data.host.localeCompare(b.data.host) || a.data.worker - b.data.worker || a.data.pid - b.data.pid);
    const rows = entries.map(({data, seen}) => {
      const redis = data.redis || {};
      const tr = row([
        [data.host],
        [data.worker, 'num'],
        [data.pid, 'num'],
        [data.sockets.websocket, 'num'],
        [data.sockets.sse, 'num'],
        [data.subscriptions, 'num'],
        [data.channels, 'num'],
        [data.rss == null ? '–' : fmt(data.rss / 1048576, 1), 'num'],
        [fmt(data.cpu, 1), 'num'],
        [redis.up ? 'up' : 'down', redis.up ? 'up' : 'down'],
        [fmt(redis.ping_ms, 2), 'num'],
        [redis.hub ? 'subscribed' : 'disconnected', redis.hub ? 'up' : 'down'],
        [redis.reconnects, 'num'],
        [`${Math.round((now - seen) / 1000)} s ago`, 'num muted'],
      ]);
      tr.dataset.worker = `${data.host}:${data.pid}`;
      tr.dataset.pid = data.pid;
      if (now - seen > STALE_AFTER) tr.classList.add('stale');
      if (redis.error) tr.title = `Redis: ${redis.error}`;
      return tr;
    });
    replaceRows($('#workers'), rows, '#workers-empty');
  }

  function renderTotals(live) {
    const sum = (pick) => live.reduce((total, {data}) => total + (pick(data) || 0), 0);
    $('#total-workers').textContent = live.length;
    $('#total-websockets').textContent = sum((d) => d.sockets.websocket);
    $('#total-sse').textContent = sum((d) => d.sockets.sse);
    $('#total-subscriptions').textContent = sum((d) => d.subscriptions);
    const status = $('#redis-status');
    if (!live.length) {
      status.textContent = '?';
      status.className = 'muted';
    } else {
      const down = live.filter(({data}) => !(data.redis && data.redis.up && data.redis.hub)).length;
      status.textContent = down ? `down on ${down}` : 'up';
      status.className = down ? 'down' : 'up';
    }
    const pings = live.map(({data}) => data.redis && data.redis.ping_ms).filter((v) => v != null);
    $('#redis-ping').textContent = pings.length ? `${fmt(Math.max(...pings), 2)} ms` : '–';
  }

  function renderChannels(live) {
    const merged = new Map();
    for (const {data} of live) {
      for (const item of data.top || []) {
        let sum = merged.get(item.channel);
        if (!sum) {
          sum = {channel: item.channel, subscribers: 0, rate: 0, presence: null, workers: 0};
          merged.set(item.channel, sum);
        }
        sum.subscribers += item.subscribers;
        sum.rate += item.rate;
        sum.workers += 1;
        if (item.presence != null) sum.presence = Math.max(sum.presence || 0, item.presence);
      }
    }
    const top = [...merged.values()]
      .sort((a, b) => b.subscribers - a.subscribers || b.rate - a.rate || a.channel.localeCompare(b.channel))
      .slice(0, MAX_CHANNELS);
    const rows = top.map((item) => {
      const tr = row([
        [item.channel],
        [item.subscribers, 'num'],
        [fmt(item.rate, 1), 'num'],
        [item.presence == null ? '–' : item.presence, 'num'],
        [item.workers, 'num'],
      ]);
      tr.dataset.channel = item.channel;
      tr.dataset.rate = item.rate;
      if (item.rate > 0) tr.classList.add('hot');
      return tr;
    });
    replaceRows($('#channels'), rows, '#channels-empty');
  }

  function renderDrops() {
    const drops = [];
    for (const {data} of workers.values()) {
      for (const drop of data.drops || []) drops.push({...drop, who: workerName(data)});
    }
    drops.sort((a, b) => b.ts - a.ts);
    const rows = drops.slice(0, MAX_DROPS).map((drop) => {
      const when = new Date(drop.ts * 1000);
      const tr = row([
        [when.toLocaleTimeString()],
        [drop.reason],
        [drop.transport],
        [drop.user == null ? 'anonymous' : drop.user, 'num'],
        [drop.who, 'muted'],
      ]);
      tr.dataset.reason = drop.reason;
      tr.title = when.toISOString();
      return tr;
    });
    replaceRows($('#drops'), rows, '#drops-empty');
  }

  // ------------------------------------------------------------ live figures

  function onFigures(data) {
    if (!data || typeof data !== 'object' || data.pid == null || !data.sockets) return;
    workers.set(`${data.host}:${data.pid}`, {data, seen: Date.now()});
    render();
  }

  let firstToken = config.token;

  /** The subscription token: the page's own first, then a fresh one for every resubscribe. */
  async function token() {
    if (firstToken) {
      const t = firstToken;
      firstToken = null;
      return t;
    }
    const response = await fetch(config.tokenUrl, {credentials: 'same-origin', headers: {Accept: 'application/json'}});
    if (!response.ok) throw new Error(`operator token refused (${response.status}): log in again as staff`);
    return (await response.json()).token;
  }

  function showState(state) {
    const badge = $('#conn-state');
    badge.textContent = state;
    badge.dataset.state = state;
  }

  const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
  const client = new OffloadClient(scheme + location.host + config.wsUrl, {onState: showState});
  // since 0-0: the channel keeps each namespace's last message, so one worker shows at once.
  client.subscribe(config.channel, onFigures, {since: '0-0', token});
  setInterval(render, 1000);
})();
