/*
 * relay-webchat.js: keeps a Bot Framework Web Chat page connected to its conversation through the
 * relay's token endpoints, across expired tokens, sleep and lost networks. No dependencies besides
 * Web Chat's own bundle (window.WebChat.createDirectLine).
 *
 *   const directLine = await RelayWebChat.connect({ baseUrl: 'https://myrelay.azurewebsites.net' });
 *   WebChat.renderWebChat({ directLine }, element);
 *
 * Why a wrapper: a Direct Line token lives about 30 minutes, and a page that sleeps past that (a
 * closed lid, a phone in a pocket, a frozen tab) comes back with a dead connection; DirectLineJS stops
 * for good after a network error or an expired token. Web Chat keeps one stable connection object
 * (the one returned here); underneath, this script refreshes the token at about half its lifetime,
 * and when the token has expired, the network comes back or the tab wakes, it asks the relay to resume
 * the same conversation (proved by a resume key the relay rotates on every use; the relay answers a
 * fresh token of the conversation it kept alive meanwhile), reads what it missed from its last watermark
 * and recreates the Direct Line connection from there. Activities are de-duplicated by id, so the
 * transcript neither loses nor repeats a message, whatever Direct Line replays.
 *
 * The connection underneath uses Direct Line's WebSocket stream where the browser has WebSocket, and
 * polls otherwise (or with webSocket: false).
 *
 * A new conversation (never a resumed one) starts with an event activity named `startEvent` carrying
 * the browser's locale, before anything the user types: a Copilot Studio agent greets on it.
 *
 * sessionStorage (per tab) keeps conversationId, userId, resumeKey and watermark; the token is never
 * stored. Options: baseUrl (the relay; default this page's origin), webSocket (true: the stream where
 * available; false: poll), pollingInterval (ms, 1000, when polling), hiddenResumeMs (a tab hidden this
 * long checks its connection when shown again, 60000), startEvent (the event a new conversation starts
 * with, 'startConversation'; '' or null: none), locale (sent with it; the browser's navigator.language,
 * else 'en-US'), storage, createDirectLine, fetch, log (function receiving diagnostic strings, never
 * tokens or keys).
 */
(function (global) {
  'use strict';

  var STATUS = { Uninitialized: 0, Connecting: 1, Online: 2, ExpiredToken: 3, FailedToConnect: 4, Ended: 5 };
  var STORAGE_KEY = 'relayWebChat';
  var MAX_RETRY_MS = 30 * 1000;
  var POST_WAIT_MS = 15 * 1000;
  var MAX_HISTORY_PAGES = 50;
  var MAX_REPLAY = 1000;

  // A minimal multicast observable: Web Chat only needs subscribe() with next/error/complete. Each
  // item is handed to `remember`; a new subscriber first gets what `replay` returns, then what comes.
  function Multicast(remember, replay) {
    var observers = [];
    return {
      next: function (item) {
        remember(item);
        observers.slice().forEach(function (o) { if (o.next) { o.next(item); } });
      },
      subscribe: function (observerOrNext, error, complete) {
        var observer = toObserver(observerOrNext, error, complete);
        observers.push(observer);
        replay().forEach(function (item) { if (observer.next) { observer.next(item); } });
        var subscription = {
          closed: false,
          unsubscribe: function () {
            subscription.closed = true;
            observers = observers.filter(function (o) { return o !== observer; });
          }
        };
        return subscription;
      }
    };
  }

  // A value that changes (the connection status): a new subscriber gets the current one.
  function Subject(initial) {
    var hasValue = arguments.length > 0;
    var value = initial;
    var subject = Multicast(function (item) {
      value = item;
      hasValue = true;
    }, function () { return hasValue ? [value] : []; });
    subject.getValue = function () { return value; };
    return subject;
  }

  // The activity stream Web Chat reads. Web Chat reads it only once connected, and stops reading while
  // it reconnects (a resume), reading again after; what came meanwhile, a reloaded page's history or
  // what the page missed asleep, would be lost to it. So every subscriber first gets what the page has
  // shown so far (the last MAX_REPLAY activities with an id: Web Chat puts an activity it already has
  // back in its place, by id), then what comes.
  function ActivityStream() {
    var shown = [];
    return Multicast(function (item) {
      if (item.id) {
        shown.push(item);
        if (shown.length > MAX_REPLAY) { shown.shift(); }
      }
    }, function () { return shown.slice(); });
  }

  function toObserver(observerOrNext, error, complete) {
    return typeof observerOrNext === 'function'
      ? { next: observerOrNext, error: error, complete: complete }
      : (observerOrNext || {});
  }

  function fromPromise(promise) {
    return {
      subscribe: function (observerOrNext, error, complete) {
        var observer = toObserver(observerOrNext, error, complete);
        var closed = false;
        promise.then(function (result) {
          if (closed) { return; }
          if (observer.next) { observer.next(result); }
          if (observer.complete) { observer.complete(); }
        }, function (err) {
          if (!closed && observer.error) { observer.error(err); }
        });
        return { unsubscribe: function () { closed = true; } };
      }
    };
  }

  function RelayError(status, code, message, retryAfter) {
    var error = new Error(message || code);
    error.status = status;
    error.code = code;
    error.retryAfter = retryAfter;
    return error;
  }

  function connect(options) {
    options = options || {};
    var baseUrl = (options.baseUrl || (global.location && global.location.origin) || '').replace(/\/$/, '');
    var storage = options.storage || global.sessionStorage;
    var createDirectLine = options.createDirectLine || (global.WebChat && global.WebChat.createDirectLine);
    var hiddenResumeMs = options.hiddenResumeMs === undefined ? 60 * 1000 : options.hiddenResumeMs;
    var webSocket = options.webSocket !== false && typeof global.WebSocket !== 'undefined';
    var pollingInterval = options.pollingInterval || 1000;
    var fetch = options.fetch || function (url, init) { return global.fetch(url, init); };
    var log = options.log || function () {};
    var startEvent = options.startEvent === undefined ? 'startConversation' : options.startEvent;
    var locale = options.locale || (global.navigator && global.navigator.language) || 'en-US';
    if (!createDirectLine) {
      return Promise.reject(new Error('relay-webchat.js needs Web Chat (window.WebChat.createDirectLine)'));
    }

    var activity$ = ActivityStream();
    var connectionStatus$ = Subject(STATUS.Uninitialized);
    var seen = {};
    var current = null;         // the DirectLineJS instance underneath
    var currentStatus = STATUS.Uninitialized;
    var underlyingStatus$ = Subject();  // every status of the connection underneath, repeats included
    var currentSubscriptions = [];
    var token = null;
    var expiresAt = 0;
    var refreshTimer = null;
    var retryTimer = null;
    var retryMs = 1000;
    var recovering = null;
    var hiddenAt = null;
    var ended = false;

    function load() {
      try { return JSON.parse(storage.getItem(STORAGE_KEY) || '{}'); } catch (e) { return {}; }
    }
    function save(patch) {
      var state = load();
      Object.keys(patch).forEach(function (key) { state[key] = patch[key]; });
      storage.setItem(STORAGE_KEY, JSON.stringify(state));
      return state;
    }
    function setStatus(status) {
      if (connectionStatus$.getValue() !== status) { connectionStatus$.next(status); }
    }
    function offline() { return global.navigator && global.navigator.onLine === false; }

    function call(path, body, bearer) {
      var headers = { 'Content-Type': 'application/json' };
      if (bearer) { headers.Authorization = 'Bearer ' + bearer; }
      return fetch(baseUrl + '/api/directline/' + path, {
        method: 'POST', headers: headers, body: JSON.stringify(body || {}), credentials: 'omit', cache: 'no-store'
      }).then(function (response) {
        return response.json().catch(function () { return {}; }).then(function (json) {
          if (!response.ok) {
            var error = json.error || {};
            var retryAfter = Number(response.headers.get('Retry-After')) || 0;
            throw RelayError(response.status, error.code || 'HttpError', error.message, retryAfter);
          }
          return json;
        });
      }, function (error) {
        throw RelayError(0, 'NetworkError', error && error.message);
      });
    }

    // Take a grant from the relay: the token for this page, and what survives a reload.
    function adopt(grant) {
      var lifetime = grant.expires_in || 1800;
      token = grant.token;
      expiresAt = Date.now() + lifetime * 1000;
      var patch = { conversationId: grant.conversationId };
      if (grant.resumeKey) { patch.resumeKey = grant.resumeKey; }
      if (grant.userId) { patch.userId = grant.userId; }
      if (grant.domain) { patch.domain = grant.domain; }
      save(patch);
      clearTimeout(refreshTimer);
      // About half the lifetime, with jitter so a room of pages does not refresh in step.
      refreshTimer = setTimeout(refresh, lifetime * 1000 * (0.45 + Math.random() * 0.1));
    }

    // Show an activity once: Direct Line replays after a reconnect, a refused watermark or a reload.
    function deliver(activity) {
      if (activity.id) {
        if (seen[activity.id]) { return; }
        seen[activity.id] = true;
      }
      activity$.next(activity);
    }

    // A new DirectLineJS underneath. `from` null: the token's new conversation; otherwise this
    // conversation from `from.watermark`: DirectLineJS reconnects with the token (which gives it a
    // stream URL from that watermark) and streams or polls from there.
    function attach(from) {
      detach();
      var state = load();
      var dlOptions = { token: token, webSocket: webSocket, pollingInterval: pollingInterval };
      if (state.domain) { dlOptions.domain = state.domain; }
      if (from) {
        dlOptions.conversationId = state.conversationId;
        dlOptions.watermark = from.watermark || '';
      }
      var instance = current = createDirectLine(dlOptions);
      currentStatus = STATUS.Uninitialized;
      currentSubscriptions.push(instance.activity$.subscribe({
        next: function (activity) {
          if (instance !== current) { return; }
          if (instance.watermark) { save({ watermark: instance.watermark }); }
          deliver(activity);
        },
        error: function () { if (instance === current) { recover(); } },
        complete: function () { if (instance === current && !ended) { recover(); } }
      }));
      currentSubscriptions.push(instance.connectionStatus$.subscribe(function (status) {
        if (instance !== current) { return; }
        currentStatus = status;
        underlyingStatus$.next(status);
        if (status === STATUS.Online) {
          retryMs = 1000;
          setStatus(STATUS.Online);
        } else if (status === STATUS.ExpiredToken || status === STATUS.FailedToConnect) {
          // Not the end for this page: show "connecting" and resume underneath.
          setStatus(STATUS.Connecting);
          recover();
        } else if (status === STATUS.Ended) {
          // Direct Line forgot the conversation (404): resume finds out and starts over if so.
          setStatus(STATUS.Connecting);
          recover();
        } else if (connectionStatus$.getValue() !== STATUS.Online) {
          setStatus(status);
        }
      }));
    }

    // What the conversation holds after `watermark` ('' = all of it), read over HTTPS with the page's
    // token and shown (once each); the watermark after it. A watermark Direct Line refuses (400) is
    // dropped: everything is read again and the ids weed out what the page has shown. Any other failure
    // leaves it to the connection underneath, from `watermark`.
    function catchUp(watermark, pages) {
      var state = load();
      var url = (state.domain || '') + '/conversations/' + encodeURIComponent(state.conversationId) +
        '/activities' + (watermark ? '?watermark=' + encodeURIComponent(watermark) : '');
      return fetch(url, {
        headers: { Authorization: 'Bearer ' + token, Accept: 'application/json' }, credentials: 'omit',
        cache: 'no-store'
      }).then(function (response) {
        if (response.status === 400 && watermark) {
          log('watermark refused: reading the conversation from its start');
          return catchUp('', pages);
        }
        if (!response.ok) { throw new Error('HTTP ' + response.status); }
        return response.json().then(function (set) {
          var activities = set.activities || [];
          var next = set.watermark || watermark;
          activities.forEach(deliver);
          save({ watermark: next });
          if (!activities.length || next === watermark || pages + 1 >= MAX_HISTORY_PAGES) { return next; }
          return catchUp(next, pages + 1);
        });
      }).then(null, function (error) {
        log('could not read what the page missed: ' + (error && error.message));
        return watermark;
      });
    }

    function detach() {
      currentSubscriptions.forEach(function (s) { s.unsubscribe(); });
      currentSubscriptions = [];
      if (current) {
        try { current.end(); } catch (e) { /* already closed */ }
      }
      current = null;
    }

    // A new conversation: a token for it, the connection, then the start event (posted once, before the
    // page is handed to Web Chat, so the bot's greeting comes before any answer; a failure is logged and
    // the page goes on without it). A stream opened without a watermark carries only what comes after it
    // opened, and the event may be posted (and answered) before that: what the bot said by the time the
    // post returns is read over HTTPS too (shown once: by id).
    function start() {
      return call('token', {}).then(function (grant) {
        save({ watermark: '' });
        adopt(grant);
        attach(null);
        if (!startEvent) { return undefined; }
        return post(asPageUser({ type: 'event', name: startEvent, locale: locale, from: {} }), true).then(
          function () { return catchUp(load().watermark || '', 0); },
          function (error) { log('the start event was not sent: ' + (error && error.code)); });
      });
    }

    // Resume the stored conversation: a fresh token of it from the relay, what the page missed since its
    // watermark (or, withWatermark false: a reloaded page with an empty transcript, all of it), then the
    // connection from there.
    function resume(withWatermark) {
      var state = load();
      if (!state.conversationId || !state.resumeKey) { return start(); }
      var watermark = withWatermark && state.watermark ? state.watermark : '';
      var body = { conversationId: state.conversationId, resumeKey: state.resumeKey };
      return call('resume', body).then(function (grant) {
        adopt(grant);
        return catchUp(watermark, 0).then(function (next) { attach({ watermark: next }); });
      }, function (error) {
        log('resume refused: ' + error.status + ' ' + error.code);
        if (error.status === 403 || error.status === 404) {
          // Not this page's conversation any more (gone, expired, revoked, lapsed): start a new one.
          storage.removeItem(STORAGE_KEY);
          return start();
        }
        throw error;
      });
    }

    // Get back to a working connection; one attempt at a time, retried until it works.
    function recover() {
      if (ended) { return Promise.resolve(); }
      if (recovering) { return recovering; }
      clearTimeout(retryTimer);
      setStatus(STATUS.Connecting);
      recovering = resume(true).then(function () {
        recovering = null;
        retryMs = 1000;
      }, function (error) {
        recovering = null;
        scheduleRetry(error);
      });
      return recovering;
    }

    function scheduleRetry(error) {
      if (ended) { return; }
      clearTimeout(retryTimer);
      if (offline()) { return; }  // the 'online' event resumes
      var delay = error && error.retryAfter ? error.retryAfter * 1000 : retryMs;
      retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
      log('retrying in ' + delay + ' ms');
      retryTimer = setTimeout(recover, delay);
    }

    function refresh() {
      if (ended || !token) { return Promise.resolve(); }
      if (recovering || Date.now() >= expiresAt) { return recover(); }
      return call('refresh', {}, token).then(function (grant) {
        adopt(grant);
        // A fresh DirectLineJS from the watermark: also revives polling that stopped on an error.
        attach({ watermark: load().watermark || '' });
      }, function (error) {
        log('refresh refused: ' + error.status + ' ' + error.code);
        return recover();
      });
    }

    // The network or the tab is back: reuse a token that still has a while to live, else resume.
    function wake() {
      if (ended || recovering) { return; }
      if (token && Date.now() < expiresAt - 60 * 1000) {
        refresh();
      } else {
        recover();
      }
    }

    // Web Chat replaces a "dl_" user id it is given by a random one (only a token may carry it), and
    // without enhanced authentication Direct Line takes from.id as sent: so every activity is stamped
    // with the session's user here, and the bot sees one user before and after a resume.
    function asPageUser(activity) {
      var userId = load().userId;
      if (!userId) { return activity; }
      var copy = {};
      Object.keys(activity).forEach(function (key) { copy[key] = activity[key]; });
      copy.from = {};
      Object.keys(activity.from || {}).forEach(function (key) { copy.from[key] = activity.from[key]; });
      copy.from.id = userId;
      return copy;
    }

    // The connection underneath once it is online (a post waits out a resume), for a while.
    function whenOnline() {
      if (current && currentStatus === STATUS.Online) { return Promise.resolve(current); }
      return new Promise(function (resolve, reject) {
        var subscription = underlyingStatus$.subscribe(function () {
          if (current && currentStatus === STATUS.Online) {
            clearTimeout(timer);
            subscription.unsubscribe();
            resolve(current);
          }
        });
        var timer = setTimeout(function () {
          subscription.unsubscribe();
          reject(RelayError(0, 'NotConnected', 'Not connected to the bot'));
        }, POST_WAIT_MS);
      });
    }

    // Post on the current connection. An expired token means Direct Line did not take the
    // activity, so it is posted once more after resuming; any other failure is reported, never
    // retried here (the activity may have arrived).
    function post(activity, mayRetry) {
      return whenOnline().then(function (instance) {
        return new Promise(function (resolve, reject) {
          instance.postActivity(activity).subscribe(function (id) {
            if (id !== 'retry') { resolve(id); return; }
            var expired = instance.connectionStatus$.getValue() === STATUS.ExpiredToken;
            if (expired && mayRetry) {
              recover().then(function () { return post(activity, false); }).then(resolve, reject);
            } else {
              reject(RelayError(0, 'PostFailed', 'The message could not be sent'));
            }
          }, reject);
        });
      });
    }

    if (global.addEventListener) {
      global.addEventListener('offline', function () {
        if (!ended) { setStatus(STATUS.Connecting); }
      });
      global.addEventListener('online', wake);
    }
    if (global.document && global.document.addEventListener) {
      // A frozen tab (Page Lifecycle: a background tab, a phone saving power) ran no timers meanwhile.
      global.document.addEventListener('resume', wake);
      global.document.addEventListener('visibilitychange', function () {
        if (global.document.visibilityState === 'hidden') {
          hiddenAt = Date.now();
        } else if (hiddenAt !== null) {
          // Sleep does not run timers: after a long absence the token may have lapsed.
          if (Date.now() - hiddenAt > hiddenResumeMs) { wake(); }
          hiddenAt = null;
        }
      });
    }

    var directLine = {
      activity$: activity$,
      connectionStatus$: connectionStatus$,
      postActivity: function (activity) { return fromPromise(post(asPageUser(activity), true)); },
      end: function () {
        ended = true;
        clearTimeout(refreshTimer);
        clearTimeout(retryTimer);
        detach();
        setStatus(STATUS.Ended);
      },
      getSessionId: function () {
        return current && current.getSessionId ? current.getSessionId() : fromPromise(Promise.resolve(''));
      },
      // Diagnostics: the conversation this page is on, its user, and when its token expires (ms).
      get conversationId() { return load().conversationId; },
      get userId() { return load().userId; },
      get tokenExpiresAt() { return expiresAt; },
      resume: function () { return recover(); }
    };

    var saved = load();
    var ready = saved.conversationId && saved.resumeKey ? resume(false) : start();
    return ready.then(function () { return directLine; });
  }

  global.RelayWebChat = { connect: connect, ConnectionStatus: STATUS };
})(typeof window !== 'undefined' ? window : this);
