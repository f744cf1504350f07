// The batch loader behind charlm.loader.BatchLoader: the same batches as charlm.loader.NumpyBatchLoader
// (whose docstring defines them), built by background threads from a shared memory map of the tokens.
// Arguments are checked in Python first; the checks here only keep bad values from reading out of bounds.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace charlm {

// A read-only memory map of a token file (uint8 or uint16 tokens, no header). open() keeps a
// process-wide cache keyed by the file's identity, so every loader of a file shares one mapping and a
// file replaced on disk (new inode or mtime) gets a new one.
class TokenFile {
 public:
  static std::shared_ptr<TokenFile> open(const std::string& path, int itemsize);
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  const std::string& path() const { return path_; }
  const void* data() const { return data_; }
  int itemsize() const { return itemsize_; }
  int64_t size() const { return size_; }  // in tokens
  int64_t max_token();                    // the largest token id; the scan runs once per mapping

 private:
  TokenFile(std::string path, void* data, int64_t bytes, int itemsize);
  template <class Tok> int64_t scan_max() const;

  std::string path_;
  void* data_;
  int64_t bytes_, size_;
  int itemsize_;
  std::once_flag max_once_;
  int64_t max_ = 0;
};

enum class Tipa { kOff = 0, kWord = 1, kWindow = 2 };

struct LoaderConfig {
  int64_t n_tokens;                  // tokens the caller expects in the file
  std::vector<uint8_t> word;         // word-token table, 256 (uint8) or 65536 (uint16) entries
  std::vector<int64_t> span_start;   // spans inside the split, in the caller's order
  std::vector<int64_t> span_length;
  int64_t batch_size, block_size;    // global batch B in rows, window T in targets
  int64_t rank, world_size;
  uint64_t seed;
  Tipa tipa;
  int64_t tipa_max;
  int threads;                       // background builders, >= 1
};

class Loader {
 public:
  Loader(std::shared_ptr<TokenFile> file, LoaderConfig config);
  ~Loader();  // joins the threads
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  int64_t local_batch_size() const { return local_batch_; }
  int64_t block_size() const { return cfg_.block_size; }
  bool tipa() const { return cfg_.tipa != Tipa::kOff; }
  int64_t max_token() { return file_->max_token(); }
  // Elements of one batch: x, y (and t with TIPA), each (local_batch_size, block_size), back to back.
  int64_t batch_elements() const { return (tipa() ? 3 : 2) * local_batch_ * cfg_.block_size; }

  // The batch of a step, taken from the prefetch queue or built now; then queues the steps after it.
  // Safe to call from several threads. Call without the GIL.
  std::unique_ptr<int64_t[]> take(int64_t step);
  void close();  // stops and joins the threads; idempotent

 private:
  enum class State { kQueued, kBuilding, kReady };
  struct Slot {
    State state = State::kQueued;
    std::unique_ptr<int64_t[]> data;
    std::exception_ptr error;
  };

  int64_t window_start(int64_t step, int64_t global_row) const;
  std::unique_ptr<int64_t[]> build(int64_t step) const;
  template <class Tok> void fill_row(const Tok* tokens, int64_t start, int64_t* x, int64_t* y, int64_t* t) const;
  void queue_after(int64_t step);  // with mu_ held
  void start_workers();            // in the constructor: all threads start, or none is left running
  void work();

  std::shared_ptr<TokenFile> file_;
  LoaderConfig cfg_;
  int64_t local_batch_;
  std::vector<int64_t> windows_before_;  // windows in the spans before each span
  int64_t num_windows_;
  uint64_t seed_hash_;
  int64_t depth_;  // steps built ahead

  std::mutex take_mu_;  // one take() at a time
  std::mutex mu_;       // guards everything below
  std::condition_variable work_cv_, done_cv_;
  std::map<int64_t, Slot> slots_;  // by step; kBuilding slots are never erased, so workers keep iterators
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace charlm
