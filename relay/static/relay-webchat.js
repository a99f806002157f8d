/*
 * relay-webchat.js: keeps a Bot Framework Web Chat page connected to its conversation through the
 * relay's token endpoints, across expired tokens, sleep and lost networks. No dependencies besides
 * Web Chat's own bundle (window.WebChat.createDirectLine).
 *
 *   const directLine = await RelayWebChat.connect({ baseUrl: 'https://myrelay.azurewebsites.net' });
 *   WebChat.renderWebChat({ directLine }, element);
 *
 * Why a wrapper: a Direct Line token lives about 30 minutes, and a page that sleeps past that (a
 * closed lid, a phone in a pocket) comes back with a dead connection; DirectLineJS stops polling
 * for good after a network error or an expired token. Web Chat keeps one stable connection object
 * (the one returned here); underneath, this script refreshes the token at about half its lifetime
 * and, when the token has expired or the network comes back, asks the relay to resume the same
 * conversation (proved by a rotating resume key) and recreates the Direct Line connection from the
 * last watermark. Activities are de-duplicated by id, so the transcript neither loses nor repeats.
 *
 * sessionStorage (per tab) keeps conversationId, resumeKey and watermark; the token is never stored.
 */
(function (global) {
  'use strict';

  var STATUS = { Uninitialized: 0, Connecting: 1, Online: 2, ExpiredToken: 3, FailedToConnect: 4, Ended: 5 };
  var STORAGE_KEY = 'relayWebChat';

  // A minimal multicast observable: Web Chat only needs subscribe() with next/error/complete.
  function Subject(initial) {
    var observers = [];
    var hasValue = arguments.length > 0;
    var value = initial;
    return {
      next: function (item) {
        value = item;
        hasValue = true;
        observers.slice().forEach(function (o) { if (o.next) { o.next(item); } });
      },
      getValue: function () { return value; },
      subscribe: function (observerOrNext, error, complete) {
        var observer = typeof observerOrNext === 'function'
          ? { next: observerOrNext, error: error, complete: complete }
          : (observerOrNext || {});
        observers.push(observer);
        if (hasValue && observer.next) { observer.next(value); }
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

  function fromPromise(promise) {
    return {
      subscribe: function (observerOrNext, error, complete) {
        var observer = typeof observerOrNext === 'function'
          ? { next: observerOrNext, error: error, complete: complete }
          : (observerOrNext || {});
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

  function RelayError(status, code, message) {
    var error = new Error(message || code);
    error.status = status;
    error.code = code;
    return error;
  }

  function connect(options) {
    options = options || {};
    var baseUrl = (options.baseUrl || '').replace(/\/$/, '');
    var storage = options.storage || global.sessionStorage;
    var createDirectLine = options.createDirectLine || (global.WebChat && global.WebChat.createDirectLine);
    var hiddenResumeMs = options.hiddenResumeMs === undefined ? 60 * 1000 : options.hiddenResumeMs;
    var pollingInterval = options.pollingInterval || 1000;
    var log = options.log || function () {};
    if (!createDirectLine) {
      return Promise.reject(new Error('relay-webchat.js needs Web Chat (window.WebChat.createDirectLine)'));
    }

    var activity$ = Subject();
    var connectionStatus$ = Subject(STATUS.Uninitialized);
    var seen = {};
    var current = null;         // the DirectLineJS instance underneath
    var currentSubscriptions = [];
    var token = null;
    var expiresAt = 0;
    var refreshTimer = null;
    var resuming = null;
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
    function forget() { storage.removeItem(STORAGE_KEY); }

    function call(path, body, bearer) {
      var headers = { 'Content-Type': 'application/json' };
      if (bearer) { headers.Authorization = 'Bearer ' + bearer; }
      return global.fetch(baseUrl + '/api/directline/' + path, {
        method: 'POST', headers: headers, body: JSON.stringify(body || {}), credentials: 'omit'
      }).then(function (response) {
        return response.json().catch(function () { return {}; }).then(function (json) {
          if (!response.ok) {
            var error = json.error || {};
            throw RelayError(response.status, error.code || 'HttpError', error.message);
          }
          return json;
        });
      });
    }

    function adopt(grant) {
      token = grant.token;
      expiresAt = Date.now() + (grant.expires_in || 1800) * 1000;
      var patch = { conversationId: grant.conversationId };
      if (grant.resumeKey) { patch.resumeKey = grant.resumeKey; }
      if (grant.userId) { patch.userId = grant.userId; }
      if (grant.domain) { patch.domain = grant.domain; }
      save(patch);
      scheduleRefresh(grant.expires_in || 1800);
    }

    function scheduleRefresh(lifetimeSeconds) {
      clearTimeout(refreshTimer);
      // About half the lifetime, with jitter so a room of pages does not refresh in step.
      var delay = lifetimeSeconds * 1000 * (0.45 + Math.random() * 0.1);
      refreshTimer = setTimeout(refresh, delay);
    }

    function refresh() {
      if (ended || !token) { return Promise.resolve(); }
      return call('refresh', {}, token).then(function (grant) {
        token = grant.token;
        expiresAt = Date.now() + (grant.expires_in || 1800) * 1000;
        if (current) {
          current.reconnect({ conversationId: grant.conversationId, token: grant.token, streamUrl: current.streamUrl });
        }
        scheduleRefresh(grant.expires_in || 1800);
      }, function (error) {
        log('refresh failed', error.code);
        return resume();
      });
    }

    function attach(watermark) {
      detach();
      var state = load();
      var dlOptions = { token: token, webSocket: false, pollingInterval: pollingInterval };
      if (state.domain) { dlOptions.domain = state.domain; }
      if (watermark !== null) {
        // Resume: reconnect to the same conversation from where this page got to.
        dlOptions.conversationId = state.conversationId;
        dlOptions.watermark = watermark || '';
      }
      current = createDirectLine(dlOptions);
      var instance = current;
      currentSubscriptions.push(instance.activity$.subscribe({
        next: function (activity) {
          if (instance !== current) { return; }
          if (instance.watermark) { save({ watermark: instance.watermark }); }
          if (activity.id && seen[activity.id]) { return; }
          if (activity.id) { seen[activity.id] = true; }
          activity$.next(activity);
        },
        error: function () { if (instance === current) { resume(); } },
        complete: function () { if (instance === current && !ended) { resume(); } }
      }));
      currentSubscriptions.push(instance.connectionStatus$.subscribe(function (status) {
        if (instance !== current) { return; }
        if (status === STATUS.Online) {
          connectionStatus$.next(STATUS.Online);
        } else if (status === STATUS.ExpiredToken || status === STATUS.FailedToConnect) {
          // Not the end for this page: show "connecting" and resume underneath.
          connectionStatus$.next(STATUS.Connecting);
          resume();
        } else if (status === STATUS.Ended) {
          // Direct Line forgot the conversation: start over with a new one.
          connectionStatus$.next(STATUS.Connecting);
          startOver();
        } else if (connectionStatus$.getValue() !== STATUS.Online) {
          connectionStatus$.next(status);
        }
      }));
    }

    function detach() {
      currentSubscriptions.forEach(function (s) { s.unsubscribe(); });
      currentSubscriptions = [];
      if (current) {
        try { current.end(); } catch (e) { /* already closed */ }
      }
      current = null;
    }

    function start() {
      return call('token', {}).then(function (grant) {
        seen = {};
        save({ watermark: '' });
        adopt(grant);
        attach(null);
      });
    }

    function startOver() {
      forget();
      return start();
    }

    // Resume the stored conversation. `fromWatermark` false replays the whole history (a new page).
    function resume(fromWatermark) {
      if (ended) { return Promise.resolve(); }
      if (resuming) { return resuming; }
      var state = load();
      if (!state.conversationId || !state.resumeKey) { return startOver(); }
      var body = { conversationId: state.conversationId, resumeKey: state.resumeKey };
      var keepWatermark = fromWatermark !== false && state.watermark;
      if (keepWatermark) { body.watermark = state.watermark; }
      connectionStatus$.next(STATUS.Connecting);
      resuming = call('resume', body).then(function (grant) {
        adopt(grant);
        attach(keepWatermark ? state.watermark : '');
      }, function (error) {
        log('resume failed', error.status, error.code);
        if (error.status === 404 || error.status === 403) { return startOver(); }
        // Offline or the relay is unreachable: try again when the network returns.
        connectionStatus$.next(STATUS.Connecting);
        throw error;
      }).then(function () { resuming = null; }, function (error) { resuming = null; throw error; });
      return resuming;
    }

    function wake() {
      if (ended) { return; }
      // Sleep does not run timers: if the token may have lapsed, resume rather than trust it.
      if (!token || Date.now() > expiresAt - 60 * 1000) { resume().catch(function () {}); } else { refresh(); }
    }

    if (global.addEventListener) {
      global.addEventListener('online', function () { resume().catch(function () {}); });
    }
    if (global.document && global.document.addEventListener) {
      global.document.addEventListener('visibilitychange', function () {
        if (global.document.visibilityState === 'hidden') {
          hiddenAt = Date.now();
        } else if (hiddenAt !== null && Date.now() - hiddenAt > hiddenResumeMs) {
          hiddenAt = null;
          wake();
        }
      });
    }

    var directLine = {
      activity$: activity$,
      connectionStatus$: connectionStatus$,
      postActivity: function (activity) {
        if (!current) { return fromPromise(Promise.reject(new Error('not connected'))); }
        var instance = current;
        return fromPromise(new Promise(function (resolve, reject) {
          instance.postActivity(activity).subscribe(resolve, function (error) {
            if (error && error.status === 403) { resume().catch(function () {}); }
            reject(error);
          });
        }));
      },
      end: function () {
        ended = true;
        clearTimeout(refreshTimer);
        detach();
        connectionStatus$.next(STATUS.Ended);
      },
      getSessionId: function () {
        return current && current.getSessionId ? current.getSessionId() : fromPromise(Promise.resolve(''));
      },
      // For tests and diagnostics: which conversation this page is on, and resume on demand.
      get conversationId() { return load().conversationId; },
      get userId() { return load().userId; },
      resume: function () { return resume(); }
    };

    var saved = load();
    var ready = saved.conversationId && saved.resumeKey
      ? resume(false).catch(function () { return startOver(); })
      : start();
    return ready.then(function () { return directLine; });
  }

  global.RelayWebChat = { connect: connect, ConnectionStatus: STATUS };
})(typeof window !== 'undefined' ? window : this);
