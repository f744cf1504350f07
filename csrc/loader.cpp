#include "loader.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <limits>
#include <stdexcept>
#include <system_error>
#include <tuple>

namespace charlm {
namespace {

constexpr int64_t kMaxBatchTokens = int64_t{1} << 40;

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// SplitMix64's finaliser; charlm.loader.splitmix64 is the same arithmetic on Python ints.
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// floor(u * n / 2**64): maps a uniform 64-bit number onto 0..n-1 exactly (bias below n / 2**64), with no
// division; charlm.loader.window_index computes the same with Python ints.
int64_t scale(uint64_t u, int64_t n) {
  return static_cast<int64_t>((static_cast<unsigned __int128>(u) * static_cast<uint64_t>(n)) >> 64);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// TokenFile

std::shared_ptr<TokenFile> TokenFile::open(const std::string& path, int itemsize) {
  require(itemsize == 1 || itemsize == 2, path + ": token size must be 1 or 2 bytes");
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), path);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw std::system_error(err, std::generic_category(), path);
  }
  using Key = std::tuple<dev_t, ino_t, off_t, time_t, long, int>;
  const Key key{st.st_dev, st.st_ino, st.st_size, st.st_mtim.tv_sec, st.st_mtim.tv_nsec, itemsize};
  static std::mutex cache_mu;
  static std::map<Key, std::weak_ptr<TokenFile>> cache;
  std::lock_guard<std::mutex> lock(cache_mu);
  for (auto it = cache.begin(); it != cache.end();) it = it->second.expired() ? cache.erase(it) : std::next(it);
  if (auto shared = cache[key].lock()) {
    ::close(fd);
    return shared;
  }
  if (st.st_size == 0 || st.st_size % itemsize != 0) {
    ::close(fd);
    throw std::invalid_argument(path + ": " + std::to_string(st.st_size) + " bytes is not a positive "
                                "multiple of the token size " + std::to_string(itemsize));
  }
  void* data = ::mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);  // the mapping keeps the file open
  if (data == MAP_FAILED) throw std::system_error(err, std::generic_category(), path + ": mmap");
  std::shared_ptr<TokenFile> file(new TokenFile(path, data, st.st_size, itemsize));
  cache[key] = file;
  return file;
}

TokenFile::TokenFile(std::string path, void* data, int64_t bytes, int itemsize)
    : path_(std::move(path)), data_(data), bytes_(bytes), size_(bytes / itemsize), itemsize_(itemsize) {}

TokenFile::~TokenFile() { ::munmap(data_, bytes_); }

int64_t TokenFile::max_token() {
  std::call_once(max_once_, [this] { max_ = itemsize_ == 1 ? scan_max<uint8_t>() : scan_max<uint16_t>(); });
  return max_;
}

template <class Tok>
int64_t TokenFile::scan_max() const {
  const Tok* tokens = static_cast<const Tok*>(data_);
  Tok max = 0;
  for (int64_t i = 0; i < size_; ++i) max = std::max(max, tokens[i]);  // vectorised at -O3
  return max;
}

// ---------------------------------------------------------------------------------------------------
// Loader: the sampling

Loader::Loader(std::shared_ptr<TokenFile> file, LoaderConfig config)
    : file_(std::move(file)), cfg_(std::move(config)) {
  const std::string& path = file_->path();
  require(file_->size() == cfg_.n_tokens, path + ": holds " + std::to_string(file_->size()) + " tokens, expected " +
                                              std::to_string(cfg_.n_tokens));
  require(cfg_.word.size() == (size_t{1} << (8 * file_->itemsize())), "word table must cover every token value");
  for (uint8_t& w : cfg_.word) w = w != 0;  // 0 or 1: fill_row multiplies by it
  require(cfg_.batch_size > 0 && cfg_.block_size > 0 && cfg_.world_size > 0 && cfg_.rank >= 0 &&
              cfg_.rank < cfg_.world_size && cfg_.batch_size % cfg_.world_size == 0,
          "bad batch_size, block_size, rank or world_size");
  // 3 * batch * block_size elements must not overflow int64 (the Python side bounds it far lower).
  require(cfg_.batch_size <= kMaxBatchTokens / cfg_.block_size, "batch_size * block_size exceeds 2**40 tokens");
  require(cfg_.tipa_max >= 1 && cfg_.tipa_max <= 255 && cfg_.threads >= 1, "bad tipa_max or threads");
  require(cfg_.span_start.size() == cfg_.span_length.size() && !cfg_.span_start.empty(), "no spans");
  local_batch_ = cfg_.batch_size / cfg_.world_size;
  const int64_t T = cfg_.block_size;
  num_windows_ = 0;
  for (size_t k = 0; k < cfg_.span_start.size(); ++k) {
    const int64_t start = cfg_.span_start[k], length = cfg_.span_length[k];
    require(start >= 0 && length >= 0 && start <= cfg_.n_tokens - length, path + ": span outside the split");
    windows_before_.push_back(num_windows_);  // the counts of charlm.loader.windows_per_span
    num_windows_ += std::max<int64_t>(length - T, 0);
  }
  require(num_windows_ > 0, path + ": no span holds a window");
  seed_hash_ = splitmix64(cfg_.seed);
  depth_ = std::max(2, cfg_.threads);
  start_workers();
}

Loader::~Loader() { close(); }

int64_t Loader::window_start(int64_t step, int64_t global_row) const {
  const int64_t w = scale(
      splitmix64(splitmix64(seed_hash_ ^ static_cast<uint64_t>(step)) ^ static_cast<uint64_t>(global_row)),
      num_windows_);
  // The span holding window w: the last one with windows_before_ <= w (spans without windows tie
  // with the next span and are passed over).
  const size_t k = std::upper_bound(windows_before_.begin(), windows_before_.end(), w) - windows_before_.begin() - 1;
  return cfg_.span_start[k] + (w - windows_before_[k]);
}

// ---------------------------------------------------------------------------------------------------
// Loader: building a batch

std::unique_ptr<int64_t[]> Loader::build(int64_t step) const {
  const int64_t n = local_batch_ * cfg_.block_size;
  std::unique_ptr<int64_t[]> data(new int64_t[batch_elements()]);  // uninitialised: every element is written
  int64_t* t = tipa() ? data.get() + 2 * n : nullptr;
  for (int64_t i = 0; i < local_batch_; ++i) {
    const int64_t start = window_start(step, cfg_.rank * local_batch_ + i);
    int64_t* x = data.get() + i * cfg_.block_size;
    int64_t* t_row = t ? t + i * cfg_.block_size : nullptr;
    if (file_->itemsize() == 1) {
      fill_row(static_cast<const uint8_t*>(file_->data()), start, x, x + n, t_row);
    } else {
      fill_row(static_cast<const uint16_t*>(file_->data()), start, x, x + n, t_row);
    }
  }
  return data;
}

// One row: reads tokens[start .. start + T] and, for word-scope TIPA, up to tipa_max tokens beyond
// (bounded by the split's end): all inside the file, as the spans were checked.
template <class Tok>
void Loader::fill_row(const Tok* tokens, int64_t start, int64_t* x, int64_t* y, int64_t* t) const {
  const int64_t T = cfg_.block_size, R = cfg_.tipa_max;
  const Tok* window = tokens + start;
  for (int64_t j = 0; j < T; ++j) {
    x[j] = window[j];
    y[j] = window[j + 1];
  }
  if (!t) return;
  if (cfg_.tipa == Tipa::kWindow) {
    for (int64_t j = 0; j < T; ++j) t[j] = std::min(T - j, R);
    return;
  }
  // Walk back from tipa_max tokens past the last target, counting the run of word tokens up to the next
  // delimiter: a run cut short by the read-ahead bound is longer than tipa_max anyway, so clips the same.
  // (run + 1) * is_word extends or resets the run without a branch, which text would mispredict.
  const uint8_t* is_word = cfg_.word.data();
  const int64_t last = start + T;  // offset of the last target
  int64_t run = 0;
  for (int64_t p = std::min(last + R, cfg_.n_tokens - 1); p > last; --p) run = (run + 1) * is_word[tokens[p]];
  for (int64_t p = last; p > start; --p) {
    run = (run + 1) * is_word[tokens[p]];
    t[p - start - 1] = std::min(run, R);
  }
}

// ---------------------------------------------------------------------------------------------------
// Loader: the prefetch queue

std::unique_ptr<int64_t[]> Loader::take(int64_t step) {
  if (step < 0) throw std::out_of_range("step " + std::to_string(step) + " out of range");
  std::lock_guard<std::mutex> one_caller(take_mu_);
  std::unique_lock<std::mutex> lock(mu_);
  if (stop_) throw std::runtime_error("the loader is closed");
  auto it = slots_.find(step);
  if (it == slots_.end() || it->second.state == State::kQueued) {
    if (it != slots_.end()) slots_.erase(it);  // not started: build it here rather than wait for a worker
    queue_after(step);
    lock.unlock();
    return build(step);
  }
  done_cv_.wait(lock, [&] { return it->second.state == State::kReady; });
  Slot slot = std::move(it->second);
  slots_.erase(it);
  queue_after(step);
  if (slot.error) std::rethrow_exception(slot.error);
  return std::move(slot.data);
}

void Loader::queue_after(int64_t step) {
  const int64_t ahead = std::min(depth_, std::numeric_limits<int64_t>::max() - step);  // none past int64
  for (auto it = slots_.begin(); it != slots_.end();) {
    const bool wanted = it->first > step && it->first - step <= ahead;
    it = (wanted || it->second.state == State::kBuilding) ? std::next(it) : slots_.erase(it);
  }
  for (int64_t k = 1; k <= ahead; ++k) {
    if (slots_.try_emplace(step + k).second) work_cv_.notify_one();  // one worker per new job
  }
}

void Loader::start_workers() {
  workers_.reserve(cfg_.threads);
  for (int i = 0; i < cfg_.threads; ++i) {
    try {
      workers_.emplace_back(&Loader::work, this);
    } catch (const std::system_error& e) {  // EAGAIN: a thread or memory limit
      close();  // a joinable std::thread destroyed by the unwinding would call std::terminate
      throw std::system_error(e.code(), "could not start loader thread " + std::to_string(i + 1) + " of " +
                                            std::to_string(cfg_.threads) + " (lower threads)");
    } catch (...) {
      close();
      throw;
    }
  }
}

void Loader::work() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    auto queued = slots_.end();
    work_cv_.wait(lock, [&] {
      queued = std::find_if(slots_.begin(), slots_.end(),
                            [](const auto& s) { return s.second.state == State::kQueued; });
      return stop_ || queued != slots_.end();
    });
    if (stop_) return;
    Slot& slot = queued->second;  // the lowest queued step: std::map is ordered
    slot.state = State::kBuilding;
    const int64_t step = queued->first;
    lock.unlock();
    std::unique_ptr<int64_t[]> data;
    std::exception_ptr error;
    try {
      data = build(step);
    } catch (...) {  // e.g. bad_alloc: rethrown to the caller of take()
      error = std::current_exception();
    }
    lock.lock();
    slot.data = std::move(data);
    slot.error = error;
    slot.state = State::kReady;
    done_cv_.notify_all();
  }
}

void Loader::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (auto& worker : workers_) {
    if (worker.joinable()) worker.join();
  }
}

}  // namespace charlm
